"""Low-memory pruning (issue 18): a model loaded block by block from its safetensors shards
(:func:`sparsekit.data.load_model_lazy`, :mod:`sparsekit.pipeline.lazy`) prunes bit for bit as the whole model
does, its output (one file per block) loads in transformers and equals the whole-model output, a resumed run
equals an uninterrupted one, bad shards are typed errors naming the file, and the host memory peak stays below
the whole-model run's by most of the model's size."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import resource
import shutil
import socket
import traceback
from pathlib import Path

import pytest
import torch

from sparsekit.data import load_model, load_model_lazy
from sparsekit.errors import InputError, ShardError
from sparsekit.pipeline import PruneConfig, Rule, prune_model_, save_pruned
from sparsekit.pipeline.fingerprint import weight_digests
from sparsekit.pipeline.lazy import SHARD_INDEX, LazyWeights, fix_mmap_threshold

transformers = pytest.importorskip("transformers")

VOCAB = 96
GRID = ((0.01, "mean"), (0.1, "mean"))


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(VOCAB - 1)} | {"[UNK]": VOCAB - 1}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


def _save(folder: Path, arch: str, layers: int, hidden: int, ffn: int, shard: str) -> Path:
    """A random model of ``arch`` saved as several safetensors shards (``max_shard_size=shard``) with a tokenizer."""
    torch.manual_seed(0)
    kw = dict(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    if arch == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw))
    else:  # Qwen3 with the LM head tied to the embeddings (saved once)
        model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**kw, head_dim=hidden // 4,
                                                                       tie_word_embeddings=True))
    model.save_pretrained(folder, max_shard_size=shard)
    _tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {arch: _save(root / arch, arch, 4, 64, 128, "60KB") for arch in ("llama", "qwen3")}


def _calib(n: int = 6) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, 32), generator=torch.Generator().manual_seed(1))


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k] != 0, want[k] != 0), f"{k}: masks differ"
        assert torch.equal(got[k], want[k]), f"{k}: weights differ"


def _whole(src: Path, config: PruneConfig, ids: torch.Tensor, out: Path) -> dict[str, torch.Tensor]:
    model, _ = load_model(str(src))
    report = prune_model_(model, config, ids)
    save_pruned(model, out, report)
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("arch,method", [("llama", "sparsegpt"), ("llama", "true-obs"), ("qwen3", "sparsegpt"),
                                         ("qwen3", "true-obs")])
def test_lazy_prunes_and_saves_as_the_whole_model(models, tmp_path, arch, method, one_thread) -> None:
    config = PruneConfig(method=method, batch_size=2)
    want = _whole(models[arch], config, _calib(), tmp_path / "whole")
    model, _ = load_model_lazy(str(models[arch]), work_dir=tmp_path / "work")
    lazy = LazyWeights.of(model)
    blocks = [n for n, p in model.named_parameters() if ".layers." in n]
    assert blocks and all(p.device.type == "meta" for n, p in model.named_parameters() if n in blocks)
    report = prune_model_(model, config, _calib())
    assert all(p.device.type == "meta" for n, p in model.named_parameters() if n in blocks)  # every block freed
    save_pruned(model, tmp_path / "lazy", report)
    files = sorted(p.name for p in (tmp_path / "lazy").glob("*.safetensors"))
    assert files == [f"model-{k:05d}-of-00005.safetensors" for k in range(1, 6)]  # 4 blocks and the rest
    index = json.loads((tmp_path / "lazy" / SHARD_INDEX).read_text())["weight_map"]
    assert index["model.layers.2.mlp.down_proj.weight"] == "model-00003-of-00005.safetensors"
    assert ("lm_head.weight" in index) == (arch == "llama")  # a tied head is saved once, as save_pretrained does
    _assert_same(_weights(tmp_path / "lazy"), want)  # transformers loads it, and it is the whole-model result
    for f in ("config.json", "generation_config.json"):
        assert (tmp_path / "lazy" / f).read_text() == (tmp_path / "whole" / f).read_text()
    assert not list(lazy.work.glob("*.tmp"))


def test_lazy_fingerprint_equals_the_whole_model(models) -> None:
    """The resume fingerprint reads the blocks from the shards: the same digests as the whole model's."""
    model, _ = load_model_lazy(str(models["qwen3"]))
    whole, _ = load_model(str(models["qwen3"]))
    assert weight_digests(model) == weight_digests(whole)
    assert all(p.device.type == "meta" for n, p in model.named_parameters() if ".layers." in n)


class Stop(Exception):
    pass


def test_resumed_lazy_run_equals_an_uninterrupted_one(models, tmp_path, one_thread) -> None:
    """Held-out regularisation, checkpoints and --resume: a lazy run stopped in the middle of block 2 and
    resumed (in a new model, as a new process would, and in the same one) equals the whole-model run."""
    config = PruneConfig(method="sparsegpt", batch_size=2, reg_grid=GRID, reg_scope="model", heldout_fraction=0.25)
    ids = _calib(8)
    want = _whole(models["llama"], config, ids, tmp_path / "whole")

    def stop(ev) -> None:
        if ev.event == "layer_done" and ev.block == 2 and ev.layer_index == 4:
            raise Stop

    for fresh in (True, False):
        ckpt = tmp_path / f"ckpt{fresh}"
        model, _ = load_model_lazy(str(models["llama"]))
        with pytest.raises(Stop):
            prune_model_(model, config, ids, stop, checkpoint_dir=ckpt)
        if fresh:
            model, _ = load_model_lazy(str(models["llama"]))
        report = prune_model_(model, config, ids, checkpoint_dir=ckpt, resume=True)
        assert report.resumed_blocks == 2
        save_pruned(model, tmp_path / f"out{fresh}", report)
        _assert_same(_weights(tmp_path / f"out{fresh}"), want)


def test_a_whole_model_checkpoint_resumes_lazily(models, tmp_path, one_thread) -> None:
    config = PruneConfig(method="sparsegpt", batch_size=2, max_blocks=3)
    want = _whole(models["llama"], config, _calib(), tmp_path / "whole")

    def stop(ev) -> None:
        if ev.event == "block_done" and ev.block == 0:
            raise Stop

    model, _ = load_model(str(models["llama"]))
    with pytest.raises(Stop):
        prune_model_(model, config, _calib(), stop, checkpoint_dir=tmp_path / "ckpt")
    lazy, _ = load_model_lazy(str(models["llama"]))
    report = prune_model_(lazy, config, _calib(), checkpoint_dir=tmp_path / "ckpt", resume=True)
    assert report.resumed_blocks == 1
    save_pruned(lazy, tmp_path / "lazy", report)
    _assert_same(_weights(tmp_path / "lazy"), want)  # block 3 (past max_blocks) copied dense from the shards


def _copy(models: dict[str, Path], tmp_path: Path) -> tuple[Path, dict]:
    src = tmp_path / "m"
    shutil.copytree(models["llama"], src)
    return src, json.loads((src / SHARD_INDEX).read_text())


def test_missing_or_corrupt_shard_is_an_error_naming_it(models, tmp_path) -> None:
    src, index = _copy(models, tmp_path)
    shard = src / index["weight_map"]["model.layers.1.mlp.up_proj.weight"]
    data = shard.read_bytes()
    shard.unlink()
    with pytest.raises(ShardError, match=f"{shard}.* is missing"):
        load_model_lazy(str(src))
    for bad in (data[: len(data) // 2], b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!"):
        shard.write_bytes(bad)
        with pytest.raises(ShardError, match=f"{shard}.*truncated or corrupt"):
            load_model_lazy(str(src))
    shard.write_bytes(data)
    model, _ = load_model_lazy(str(src))
    shard.unlink()  # spoilt after loading (a new file: what is mapped of the old one stays valid) ...
    shard.write_bytes(data[:100])  # ... the error comes when the block is read
    with pytest.raises(ShardError, match=str(shard)):
        prune_model_(model, PruneConfig(method="sparsegpt", batch_size=2), _calib())


def test_a_tensor_missing_from_the_index_is_an_error_naming_it(models, tmp_path) -> None:
    src, index = _copy(models, tmp_path)
    del index["weight_map"]["model.layers.3.self_attn.o_proj.weight"]
    (src / SHARD_INDEX).write_text(json.dumps(index))
    with pytest.raises(ShardError, match=rf"model\.layers\.3\.self_attn\.o_proj\.weight .*{src}.*{SHARD_INDEX}"):
        load_model_lazy(str(src))
    other = index["weight_map"]["model.layers.0.self_attn.q_proj.weight"]
    assert other != json.loads((models["llama"] / SHARD_INDEX).read_text())["weight_map"][
        "model.layers.3.self_attn.o_proj.weight"]
    index["weight_map"]["model.layers.3.self_attn.o_proj.weight"] = other  # a file that does not hold it
    (src / SHARD_INDEX).write_text(json.dumps(index))
    with pytest.raises(ShardError, match=rf"{SHARD_INDEX} places model\.layers\.3\.self_attn\.o_proj\.weight in "
                                         rf"{src / other}, which does not hold it"):
        load_model_lazy(str(src))
    (src / SHARD_INDEX).write_text("{")
    with pytest.raises(ShardError, match=f"{src / SHARD_INDEX} is not a safetensors index"):
        load_model_lazy(str(src))
    for f in src.glob("*.safetensors*"):
        f.unlink()
    with pytest.raises(InputError, match="cannot be loaded block by block"):
        load_model_lazy(str(src))


def _cli(argv: list[str], env: dict[str, str], conn) -> None:
    """In a forked child (``--low-memory`` changes the process's malloc settings): ``sparsekit <argv>`` with
    ``env`` set; sends the exit code."""
    os.environ.update(env)
    try:
        from sparsekit.cli import main

        conn.send(main(argv))
    except BaseException as e:  # noqa: BLE001
        conn.send(f"{type(e).__name__}: {e}")


def _run_cli(argv: list[str], env: dict[str, str] | None = None) -> None:
    recv, send = mp.get_context("fork").Pipe(duplex=False)
    p = mp.get_context("fork").Process(target=_cli, args=(argv, env or {}, send))
    p.start()
    assert recv.recv() == 0
    p.join(60)


def _prune_argv(models: dict[str, Path], tmp_path: Path) -> list[str]:
    text = tmp_path / "calib.txt"
    g = torch.Generator().manual_seed(3)
    text.write_text(" ".join(f"w{int(i)}" for i in torch.randint(0, VOCAB - 1, (4000,), generator=g)))
    return ["prune", "--model", str(models["llama"]), "--method", "sparsegpt", "--calib", str(text), "--tokens", "256",
            "--seq-len", "32", "--batch-size", "2", "--no-eval", "--reg-grid", "none", "--device", "cpu"]


def test_cli_low_memory_equals_the_whole_model(models, tmp_path, one_thread) -> None:
    common = _prune_argv(models, tmp_path)
    _run_cli([*common, "--out", str(tmp_path / "whole")])
    _run_cli([*common, "--out", str(tmp_path / "lazy"), "--low-memory"])
    assert len(list((tmp_path / "lazy").glob("model-*-of-00005.safetensors"))) == 5
    assert not (tmp_path / "lazy" / "checkpoints").exists()  # the work folder went with the checkpoints
    _assert_same(_weights(tmp_path / "lazy"), _weights(tmp_path / "whole"))


def test_low_memory_is_the_default_under_torchrun(models, tmp_path, one_thread) -> None:
    """Rank 0 of a 1-rank torchrun job: low memory unless --no-low-memory."""
    common = _prune_argv(models, tmp_path)
    for flag, lazy in (([], True), (["--no-low-memory"], False)):
        env = dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
        _run_cli([*common, *flag, "--out", str(tmp_path / str(lazy))], env)
        assert (tmp_path / str(lazy) / "model-00005-of-00005.safetensors").exists() == lazy
    _assert_same(_weights(tmp_path / "True"), _weights(tmp_path / "False"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, world: int, port: int, src: str, out: str, config: PruneConfig | None = None,
          ids: torch.Tensor | None = None, ckpt: str | None = None) -> None:
    """One gloo rank pruning the lazily loaded model (``config``: default true-obs; ``ckpt``: resume from this
    checkpoint); rank 0 saves; ``rank{r}.json`` says what happened."""
    import datetime

    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    result: dict = {}
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
        model, _ = load_model_lazy(src)
        config = config or PruneConfig(method="true-obs", batch_size=2, row_parts=2)
        resume = {} if ckpt is None else {"checkpoint_dir": ckpt, "resume": True}
        report = prune_model_(model, config, _calib() if ids is None else ids, **resume)
        result["meta"] = all(p.device.type == "meta" for n, p in model.named_parameters() if ".layers." in n)
        if rank == 0:
            save_pruned(model, out, report)
        else:  # rank 0 alone kept the pruned blocks
            with pytest.raises(InputError, match="save on rank 0"):
                save_pruned(model, Path(out, "rank1"), report)
        dist.destroy_process_group()
    except Exception as e:  # noqa: BLE001 - the test reads it
        result["error"] = f"{type(e).__name__}: {e}\n{traceback.format_exc()}"
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))


def _two_lazy_ranks(src: Path, out: Path, *args: object) -> None:
    """``_rank`` on 2 forked gloo ranks (``args``: its optional ones); asserts that neither failed and that both
    freed every block."""
    out.mkdir()
    ctx = mp.get_context("fork")
    port = _free_port()
    procs = [ctx.Process(target=_rank, args=(r, 2, port, str(src), str(out), *args)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    for r in range(2):
        res = json.loads((out / f"rank{r}.json").read_text())
        assert "error" not in res, res["error"]
        assert res["meta"]


def test_two_lazy_ranks_match_one_whole_process(models, tmp_path, one_thread) -> None:
    want = _whole(models["llama"], PruneConfig(method="true-obs", batch_size=2), _calib(), tmp_path / "whole")
    _two_lazy_ranks(models["llama"], tmp_path / "dist")
    _assert_same(_weights(tmp_path / "dist"), want)


def test_two_lazy_ranks_resume_a_held_out_run(models, tmp_path, one_thread) -> None:
    """``torchrun``'s defaults for a local model (--low-memory, --reg-grid) on --resume: every rank runs the held-out
    slice through the finished blocks again, which rank 1 (which writes no block) reads from the checkpoint."""
    config = PruneConfig(method="sparsegpt", batch_size=2, reg_grid=GRID, reg_scope="model", heldout_fraction=0.25,
                         max_blocks=2)
    ids = _calib(8)
    want = _whole(models["llama"], config, ids, tmp_path / "whole")

    def stop(ev) -> None:
        if ev.event == "block_done" and ev.block == 0:
            raise Stop

    model, _ = load_model_lazy(str(models["llama"]))
    with pytest.raises(Stop):
        prune_model_(model, config, ids, stop, checkpoint_dir=tmp_path / "ckpt")
    _two_lazy_ranks(models["llama"], tmp_path / "dist", config, ids, str(tmp_path / "ckpt"))
    _assert_same(_weights(tmp_path / "dist"), want)


# -- host memory ------------------------------------------------------------------------------------------------

def _peak_rss(src: str, low: bool, out: str, conn) -> None:
    """In a forked child: load (whole or lazily), prune, save; send the peak resident size in bytes. Only k_proj
    is pruned (the others are skipped: pruning time is not what is measured); every block is still read, run
    on the calibration tokens and written."""
    try:
        torch.set_num_threads(1)
        if low:
            fix_mmap_threshold()  # as sparsekit prune --low-memory does
        model, _ = (load_model_lazy if low else load_model)(src)
        config = PruneConfig(method="sparsegpt", batch_size=2, rules=[Rule(r"mlp|[qvo]_proj", method="skip")])
        save_pruned(model, out, prune_model_(model, config, _calib(2)))
        conn.send(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # Linux: KiB
    except Exception as e:  # noqa: BLE001
        conn.send(f"{type(e).__name__}: {e}\n{traceback.format_exc()}")


def test_host_memory_peak_stays_below_the_whole_model(tmp_path) -> None:
    """8 blocks of 15.7 MB (float32): the low-memory peak is at least 4 blocks below the whole-model peak (both
    runs forked from this process, so they start from the same resident size). Measured: 6.2 blocks below; the
    whole-model run's resident size grows by a block per block (its weights are paged in from the mmap-ed
    shards as they are used), the low-memory run's stays flat."""
    src = _save(tmp_path / "big", "llama", 8, 512, 2048, "30MB")
    with torch.device("meta"):
        skeleton = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(src))
    block = sum(p.numel() * 4 for p in skeleton.model.layers[0].parameters())  # bytes of one float32 block
    peaks = {}
    ctx = mp.get_context("fork")
    for low in (False, True):
        recv, send = ctx.Pipe(duplex=False)
        p = ctx.Process(target=_peak_rss, args=(str(src), low, str(tmp_path / f"out{low}"), send))
        p.start()
        peaks[low] = recv.recv()
        p.join(120)
        assert isinstance(peaks[low], int), peaks[low]
    assert peaks[True] <= peaks[False] - 4 * block, (peaks, block)
    _assert_same(_weights(tmp_path / "outTrue"), _weights(tmp_path / "outFalse"))
