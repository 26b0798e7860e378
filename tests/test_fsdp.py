"""FSDP2 on two CPU processes (gloo), by both routes users take: transformers' ``DistributedConfig(fsdp_size=2)``
and accelerate's FSDP plugin (``fsdp_config={"version": 2}``; see ``fsdp_train.emulate_accelerate_fsdp_on_cpu``).
SmoothOut perturbs and restores each rank's shards in place; the forward pass sees one global noise sample with the
exact per-row law."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from conftest import run_launcher
from test_golden import check, load_golden

SCRIPT = Path(__file__).with_name("fsdp_train.py")
# accelerate's FSDP2 plugin as the Trainer builds it. BERT lists no _no_split_modules, and accelerate's default
# wrapping then fails inside fully_shard for the plain Trainer too, so BERT names its layer class.
ACCELERATE_FSDP = {
    "bert": ["--fsdp", "full_shard", "--fsdp_config", '{"version": 2, "transformer_layer_cls_to_wrap": ["BertLayer"]}'],
    "gpt2": ["--fsdp", "full_shard", "--fsdp_config", '{"version": 2}'],
}


def run_fsdp_train(out: Path, model: str, route: str, *, evaluate: bool = True, vocab: int = 64) -> dict:
    """``tests/fsdp_train.py`` on 2 processes: 4 steps of 2 micro-batches; returns its result."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(SCRIPT),
        "--use_cpu", "--output_dir", str(out), "--max_steps", "4", "--per_device_train_batch_size", "8",
        "--gradient_accumulation_steps", "2", "--learning_rate", "0.01", "--report_to", "none",
        "--save_strategy", "no", "--disable_tqdm", "true", "--smoothout_strength", "0.05", "--seed", "3",
    ]  # fmt: skip
    if evaluate:  # evaluation before and between training steps leaves FSDP2's root (and accelerate's tail) unsharded
        cmd += ["--eval_on_start", "true", "--eval_strategy", "steps", "--eval_steps", "2"]
    if route == "accelerate":
        cmd += ACCELERATE_FSDP[model]
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FSDP_TEST_MODEL", model)
        patch.setenv("FSDP_TEST_ROUTE", route)
        patch.setenv("FSDP_TEST_VOCAB", str(vocab))
        run_launcher(cmd)
    result = json.loads((out / "fsdp_result.json").read_text())
    assert result["route"] == route
    return result


@pytest.mark.multiprocess
@pytest.mark.parametrize("route", ["transformers", "accelerate"])
@pytest.mark.parametrize(
    ("model", "sharded", "full"),
    [("bert", [32, 32], [64, 32]), ("gpt2", [16, 128], [32, 128])],  # gpt2: Conv1D [in, out], rows split
)
def test_fsdp2_shards_get_the_noise_law_and_are_restored_bit_exactly(tmp_path, model, sharded, full, route):
    result = run_fsdp_train(tmp_path, model, route)
    assert result["model"] == model and result["world_size"] == 2 and result["steps"] == 4
    assert result["placements"] == "(Shard(dim=0),)"
    assert result["sharded_rows"] == sharded and result["full_rows"] == full  # each rank holds half of dim 0
    assert result["forward_saw_noise"]
    assert result["max_relative_row_norm_error"] < 1e-5  # every full row's noise has norm a * ||w_row||
    if model == "gpt2":  # rows split: each row's noise is normalized as a whole (all-reduced), not per shard
        assert result["noise_split_deviates_from_weight_split"] > 1e-3
    assert result["same_noisy_weight_on_all_ranks"]  # one global sample per micro-batch
    assert result["shards_restored_each_step"] == [True] * 4  # bit-exact on every rank before every step
    assert result["params_changed"]
    # evaluated before and between steps, yet the engine stays on the shards and drew once per micro-batch
    assert result["evaluated"] and result["draws"] == 8
    assert result["unsharded_at_step_begin"][0]  # the evaluation on start left temporary full weights behind...
    assert result["engine_on_shards_each_step"] == [True] * 4  # ...yet every step perturbed the shards
    assert result["last_noise_norm"] > 0
    check(f"fsdp2/{model}-{route}", result["golden"], load_golden())  # the same noise and weights as when recorded


@pytest.mark.multiprocess
def test_fsdp2_first_forward_moving_a_padded_shard_leaves_no_noise(tmp_path):
    """No evaluation before the first step, and an odd vocabulary: FSDP2's first forward (its lazy init) copies the
    last rank's padded embedding shard, noise and all, to new storage while the weights are perturbed. The engine
    restores the clean values there too (before, that rank's embeddings kept the first draw's noise for good)."""
    result = run_fsdp_train(tmp_path, "bert", "transformers", evaluate=False, vocab=65)
    assert result["world_size"] == 2 and result["steps"] == 4 and not result["evaluated"]
    assert result["shards_restored_each_step"] == [True] * 4  # every parameter, every rank, before every step
    assert result["draws"] == 8 and result["params_changed"]


@pytest.mark.multiprocess
def test_accelerate_fsdp2_draws_the_same_noise_as_transformers_fsdp2(tmp_path):
    """The plugin shards inside train(): the engine rebinds to the new DTensor parameters and draws the same
    global noise as a model sharded at load time (whose training equals an unsharded replay, below)."""
    import torch

    first, last = [], []
    for route in ("transformers", "accelerate"):
        result = run_fsdp_train(tmp_path / route, "bert", route)
        assert result["shards_restored_each_step"] == [True] * 4
        first.append(torch.load(tmp_path / route / "first_noise.pt"))
        last.append(torch.load(tmp_path / route / "last_noise.pt"))
    assert torch.count_nonzero(first[0]) == first[0].numel()
    assert torch.equal(first[0], first[1])
    # the 8th draw too (the rebuilt engine kept the noise position). Its per-row scale follows weights that the
    # two routes' sums have rounded differently, and the noisy-minus-clean difference rounds: close, not equal.
    assert not torch.allclose(last[0], first[0], atol=1e-3)
    torch.testing.assert_close(last[1], last[0], rtol=1e-4, atol=1e-6)


@pytest.mark.multiprocess
def test_fsdp2_training_equals_unsharded_training_with_the_same_global_noise(tmp_path):
    script = Path(__file__).with_name("fsdp_reference_train.py")
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
        "--use_cpu", "--output_dir", str(tmp_path), "--max_steps", "4", "--per_device_train_batch_size", "8",
        "--learning_rate", "0.01", "--warmup_steps", "0", "--report_to", "none", "--save_strategy", "no",
        "--disable_tqdm", "true", "--smoothout_strength", "0.05", "--seed", "3",
    ]  # fmt: skip
    run_launcher(cmd)
    result = json.loads((tmp_path / "fsdp_reference_result.json").read_text())
    assert result["steps"] == 4
    # equal up to the order of floating-point sums (sharded reduce-scatter vs one process)...
    assert result["max_diff_with_noise"] < 1e-4
    # ...while leaving the noise out of the replay changes the weights by far more
    assert result["max_diff_without_noise"] > 100 * result["max_diff_with_noise"]


@pytest.mark.multiprocess
@pytest.mark.parametrize("route", ["transformers", "accelerate-full", "accelerate-sharded"])
def test_fsdp2_resume_from_a_checkpoint_is_bit_exact(tmp_path, monkeypatch, route):
    """transformers cannot resume a model sharded at load time; SmoothOutTrainer's sharded checkpoint can. Under
    accelerate's plugin the Trainer's own FSDP checkpoints (full or sharded state dict) resume bit-exactly."""
    script = Path(__file__).with_name("fsdp_resume_train.py")
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
        "--use_cpu", "--output_dir", str(tmp_path), "--max_steps", "6", "--save_strategy", "steps",
        "--save_steps", "3", "--per_device_train_batch_size", "4",
        "--learning_rate", "0.01", "--report_to", "none", "--disable_tqdm", "true",
        "--smoothout_strength", "0.05", "--seed", "3",
    ]  # fmt: skip
    if route == "transformers":
        cmd += ["--save_only_model", "true"]
    else:
        state_dict = {"accelerate-full": "FULL_STATE_DICT", "accelerate-sharded": "SHARDED_STATE_DICT"}[route]
        fsdp_config = {"version": 2, "transformer_layer_cls_to_wrap": ["BertLayer"], "state_dict_type": state_dict}
        cmd += ["--fsdp", "full_shard", "--fsdp_config", json.dumps(fsdp_config)]
        monkeypatch.setenv("FSDP_TEST_ROUTE", "accelerate")
    run_launcher(cmd)
    result = json.loads((tmp_path / "fsdp_resume_result.json").read_text())
    assert result["world_size"] == 2 and result["sharded_state_saved"] == (route == "transformers")
    if route == "accelerate-full":
        assert "pytorch_model_fsdp.bin" in result["checkpoint_files"]
    if route == "accelerate-sharded":
        assert "pytorch_model_fsdp_0" in result["checkpoint_files"]
    assert result["steps"] == [6, 6] and result["draws"] == [6, 6]
    assert result["trained"]
    assert result["resumed_equals_uninterrupted"], result["max_difference"]
    if route == "transformers":  # one process cannot continue the sharded optimizer and schedule: a clear stop
        fewer = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
                 str(script.with_name("fsdp_resume_fewer.py")), *cmd[cmd.index("--use_cpu"):]]  # fmt: skip
        run_launcher(fewer)
        stopped = json.loads((tmp_path / "fsdp_resume_fewer.json").read_text())
        assert stopped["world_size"] == 1 and stopped["learning_rates"] == []
        assert "would silently restart both" in stopped["error"]


@pytest.mark.multiprocess
def test_fsdp2_noise_is_the_same_for_2_and_4_shards(tmp_path):
    """FSDP2 shards draw global row blocks from seeds without the rank: the gathered noise ignores the shard count."""
    import torch

    noises = []
    for shards in (2, 4):
        out = tmp_path / f"shards{shards}"
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(shards),
            str(SCRIPT), "--use_cpu", "--output_dir", str(out), "--max_steps", "1", "--per_device_train_batch_size",
            "8", "--report_to", "none", "--save_strategy", "no", "--disable_tqdm", "true",
            "--smoothout_strength", "0.05", "--seed", "3",
        ]  # fmt: skip
        env_shards = {"FSDP_TEST_SHARDS": str(shards), "FSDP_TEST_MODEL": "bert"}
        with pytest.MonkeyPatch.context() as patch:
            for key, value in env_shards.items():
                patch.setenv(key, value)
            run_launcher(cmd)
        result = json.loads((out / "fsdp_result.json").read_text())
        assert result["world_size"] == shards and result["sharded_rows"] == [64 // shards, 32]
        noises.append(torch.load(out / "first_noise.pt"))
    assert torch.count_nonzero(noises[0]) == noises[0].numel()
    assert torch.equal(noises[0], noises[1])


def run_fsdp_tied_train(out: Path, *, vocab: int = 65, pad: int = 0, extra: tuple[str, ...] = ()) -> dict:
    """``tests/fsdp_tied_train.py`` on 2 processes: a tied GPT-2 LM, evaluated on start and after every 2 of its 4
    steps of 2 micro-batches; returns its result."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        str(SCRIPT.with_name("fsdp_tied_train.py")), "--use_cpu", "--output_dir", str(out), "--max_steps", "4",
        "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2", "--learning_rate", "0.01",
        "--report_to", "none", "--save_strategy", "no", "--disable_tqdm", "true", "--smoothout_strength", "0.05",
        "--seed", "3", "--eval_on_start", "true", "--eval_strategy", "steps", "--eval_steps", "2", *extra,
    ]  # fmt: skip
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FSDP_TEST_VOCAB", str(vocab))
        patch.setenv("FSDP_TEST_PAD", str(pad))
        run_launcher(cmd)
    result = json.loads((out / "fsdp_tied_result.json").read_text())
    assert result["world_size"] == 2 and result["tied"]
    return result


@pytest.mark.multiprocess
def test_fsdp2_refuses_a_tied_embedding_that_transformers_shards_unevenly(tmp_path):
    """transformers ties lm_head to the embedding after fully_shard: two FSDP2 records gather the one weight, and with
    65 rows over 2 ranks rank 1's embedding rows come from a padded copy nothing writes. Before the refusal, the 32
    rows of every micro-batch after the first evaluation carried no noise in the forward pass."""
    result = run_fsdp_tied_train(tmp_path)
    assert result["rows"] == 65
    for error in result["errors"]:  # every rank refuses alike (no rank waits in a collective)
        assert "'transformer.wte.weight'" in error and "'lm_head'" in error and "'transformer.wte'" in error
        assert "65 rows on dim 0, sharded over 2 FSDP2 ranks" in error
        assert "resize_token_embeddings(model.config.vocab_size, pad_to_multiple_of=2)" in error
        assert "tie_word_embeddings=False" in error and "exclude=['transformer.wte.weight']" in error


@pytest.mark.multiprocess
def test_fsdp2_tied_embedding_padded_to_the_shard_count_gets_noise_on_every_row_after_evaluation(tmp_path):
    result = run_fsdp_tied_train(tmp_path, pad=2)
    assert result["rows"] == 66 and result["errors"] == ["", ""]
    assert result["steps"] == 4 and result["evaluated"]
    assert result["rows_without_noise"] == [0] * 8  # every global row noisy in every micro-batch, on both ranks
    assert result["rows_off_the_parameter"] == [0] * 8  # the forward read exactly the noisy parameter


@pytest.mark.multiprocess
def test_fsdp2_tied_uneven_embedding_left_out_by_exclude_trains_and_shows_the_stale_rows(tmp_path):
    """The refusal is about the selected weight only. With it left clean, training runs; the forward still reads
    rank 1's stale rows of the embedding once an optimizer step has moved the parameter (plain FSDP2 does too)."""
    result = run_fsdp_tied_train(tmp_path, extra=("--smoothout_exclude", "transformer.wte.weight"))
    assert result["errors"] == ["", ""] and result["steps"] == 4
    assert result["rows_without_noise"] == [65, 65] + [33] * 6  # no noise; after step 1 rank 1's rows are stale
    assert result["rows_off_the_parameter"] == [0, 0] + [32] * 6
