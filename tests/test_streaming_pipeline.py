"""The read -> compute -> write pipeline and the blocked kernels: byte for byte what the serial
code before them wrote (tests/streaming_reference.py), bounded in memory, errors as before."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest
import torch

from internvl_tools.errors import CheckpointError, InputError
from internvl_tools.io import buffers
from internvl_tools.formats import base as formats_base
from internvl_tools.formats import bnb_int8, compressed_tensors
from internvl_tools.tiny.generator import make_peft_adapter
from internvl_tools.transforms import int8 as int8_module
from internvl_tools.transforms import merge_lora, pipeline, stream

from . import streaming_reference as ref
from .support import all_bytes

SHAPES = [(301, 259), (1100, 300), (7, 4096), (3, 5)]


def _weight(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(*shape, generator=g) * 0.05).to(dtype)
    w[1] = 0  # an all-zero row
    if shape[1] > 4:
        w[2, :3] = 1e-30  # below float16's range
        w[0, 1] = 6e4  # near float16's top
    return w


def _same(got, want):
    got = list(got.values()) if isinstance(got, dict) else list(got)
    want = list(want.values()) if isinstance(want, dict) else list(want)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape and torch.equal(g, w)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_8bit_kernels_equal_the_serial_ones(shape, dtype, monkeypatch):
    """bnb, W8A16 (packed straight into bytes) and W8A8, with reused buffers and cache-sized blocks
    (also a few rows per block), give the bytes of the whole-block kernels; the input is left as it was."""
    w = _weight(shape, dtype)
    before = w.clone()
    for elements in (formats_base.BLOCK_ELEMENTS, 1000):
        monkeypatch.setattr(formats_base, "BLOCK_ELEMENTS", elements)
        _same(bnb_int8.quantize_rowwise(w), ref.quantize_rowwise(w.clone()))
        _same(bnb_int8.quantize_rowwise(w, row_block=64), ref.quantize_rowwise(w.clone(), row_block=64))
        _same(compressed_tensors.quantize(w), ref.ct_quantize(w.clone()))
        _same(compressed_tensors.quantize_symmetric_channel(w), ref.quantize_symmetric_channel(w.clone()))
        _same(compressed_tensors.quantize_w8a8(w), ref.quantize_w8a8(w.clone()))
    assert torch.equal(w, before)


@pytest.mark.parametrize("factors", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows,cols,rank", [(1100, 300, 8), (300, 259, 4), (128, 4100, 16)])
def test_blocked_merge_equals_the_serial_one(rows, cols, rank, factors, monkeypatch):
    """The blocked merge (cache-sized blocks, a power-of-two scale folded into A, oneDNN's inner
    product or torch.mm for B A) gives the bytes of the whole-block float32 merge; NaN / Inf refused."""
    g = torch.Generator().manual_seed(1)
    tensors = {"w": torch.randn(rows, cols, generator=g).bfloat16(), "a": torch.randn(rank, cols, generator=g).to(factors),
               "b": torch.randn(rows, rank, generator=g).to(factors), "ea": torch.randn(rank, rows, generator=g).to(factors),
               "eb": torch.randn(cols, rank, generator=g).to(factors)}
    sources = SimpleNamespace(get=lambda source, key: tensors[key])
    ops = (SimpleNamespace(source="x", a="a", b="b", scale=0.37, kind="lora"),
           SimpleNamespace(source="x", a="ea", b="eb", scale=2.0, kind="embedding"),
           SimpleNamespace(source="x", a="a", b="b", scale=0.25, kind="lora"))
    want = ref.blocked_merge(tensors["w"], ops, sources, "k")
    assert merge_lora._onednn_ok(rank) or not hasattr(torch.ops.mkldnn, "_linear_pointwise")
    for onednn in (True, False):
        monkeypatch.setattr(merge_lora, "_ONEDNN", {} if onednn else {rank: False})
        for elements in (merge_lora.BLOCK_ELEMENTS, rows * cols // 5):
            monkeypatch.setattr(merge_lora, "BLOCK_ELEMENTS", elements)
            assert torch.equal(merge_lora._blocked(tensors["w"], ops, sources, "k"), want)
    tensors["a"][0, 3] = float("inf")
    with pytest.raises(InputError, match="NaN or Inf"):
        merge_lora._blocked(tensors["w"], ops, sources, "k")


def test_blocked_merge_refuses_a_float16_overflow():
    """A float16 weight whose merged value passes float16's range (finite in float32) is refused, not
    written as Inf; a sum that overflows float16 where no element does is not."""
    w = torch.full((64, 64), 6e4, dtype=torch.float16)
    tensors = {"w": w, "a": torch.ones(1, 64), "b": torch.full((64, 1), 1e4)}
    sources = SimpleNamespace(get=lambda source, key: tensors[key])
    with pytest.raises(InputError, match="NaN or Inf"):
        merge_lora._blocked(w, (SimpleNamespace(source="x", a="a", b="b", scale=1.0, kind="lora"),), sources, "k")
    tensors["b"] = torch.full((64, 1), 1.0)
    merged = merge_lora._blocked(w, (SimpleNamespace(source="x", a="a", b="b", scale=1.0, kind="lora"),), sources, "k")
    assert torch.equal(merged, torch.full((64, 64), 6e4 + 1, dtype=torch.float16))


def _serial(monkeypatch):
    """Run every streamed command the way the code before the pipeline did."""
    monkeypatch.setattr(stream, "run_pipeline", ref.serial_run)
    monkeypatch.setattr(merge_lora, "_blocked", ref.blocked_merge)
    for name, reference in (("bnb", ref.bnb_quantize), ("compressed-tensors", ref.ct_quantize), ("w8a8", ref.quantize_w8a8)):
        current = int8_module.FORMATS[name]

        def quantize(weight, reference=reference, current=current):  # specs (meta tensors) as planned today
            return current.quantize(weight) if weight.device.type == "meta" else reference(weight)

        monkeypatch.setitem(int8_module.FORMATS, name, int8_module.Int8Writer(current.written, quantize, current.quantization_config))


def _files(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


COMMANDS = {
    "int8 bnb": lambda src, extra: ["quantize", src, "--method", "int8"],
    "int8 compressed-tensors": lambda src, extra: ["quantize", src, "--method", "int8", "--format", "compressed-tensors"],
    "int8 w8a8": lambda src, extra: ["quantize", src, "--method", "int8", "--format", "w8a8"],
    "merge-lora embedded": lambda src, extra: ["merge-lora", extra["embedded"]],
    "merge-lora peft": lambda src, extra: ["merge-lora", src, "--adapter", extra["adapter"]],
    "convert --to hf": lambda src, extra: ["convert", src, "--to", "hf"],
    "convert --to original": lambda src, extra: ["convert", extra["hf"], "--to", "original"],
}


@pytest.fixture(scope="module")
def inputs(tiny, tmp_path_factory):
    from click.testing import CliRunner

    from internvl_tools.cli.main import cli

    family = "InternVL2-Llama3-76B"
    root = tmp_path_factory.mktemp("pipeline-inputs")
    hf = root / "hf"
    assert CliRunner().invoke(cli, ["convert", str(tiny(family)), "-o", str(hf), "--to", "hf"]).exit_code == 0
    adapter = make_peft_adapter(tiny(family), root / "adapter", rank=4, alpha=16)
    return tiny(family), {"embedded": tiny(family, lora="embedded"), "adapter": adapter, "hf": hf}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_streamed_commands_write_the_serial_bytes(command, inputs, tmp_path, run_cli, monkeypatch):
    """Each command through the pipeline (blocks forced small, budget forced small so items queue and
    wait) writes the files the serial code wrote, tensor bytes and side files alike."""
    src, extra = inputs
    argv = [str(a) for a in COMMANDS[command](src, extra)]
    with monkeypatch.context() as patch:
        _serial(patch)
        assert run_cli(*argv, "-o", tmp_path / "serial", "--max-shard-size", "200KB").exit_code == 0
    monkeypatch.setattr(formats_base, "BLOCK_ELEMENTS", 4096)
    monkeypatch.setattr(merge_lora, "BLOCK_ELEMENTS", 4096)
    monkeypatch.setattr(pipeline, "PIPELINE_BYTES", 300_000)
    result = run_cli(*argv, "-o", tmp_path / "piped", "--max-shard-size", "200KB")
    assert result.exit_code == 0, result.output
    serial, piped = all_bytes(tmp_path / "serial"), all_bytes(tmp_path / "piped")
    assert list(serial) and serial == piped
    assert _files(tmp_path / "serial") == _files(tmp_path / "piped")


class _FakeView:
    """Sources of known sizes; records the bytes held by the pipeline when each tensor is read."""

    def __init__(self, sizes):
        self.sizes = sizes

    def get(self, name):
        return torch.full((self.sizes[name],), 1, dtype=torch.uint8)


class _FakeWriter:
    def __init__(self, fail_on=None):
        self.written, self.fail_on = {}, fail_on

    def write(self, name, tensor, stop=None):
        if name == self.fail_on:
            raise CheckpointError(f"out/model.safetensors: No space left on device while writing {name!r}; free disk space")
        self.written[name] = tensor.clone()

    def copy_stored(self, name, stored, stop=None):
        self.written[name] = stored


def _items(count, size):
    return [pipeline.Item([(f"t{i}", lambda t: t + 1)], (f"s{i}",), None, size, size, size) for i in range(count)]


def test_pipeline_holds_at_most_its_budget(monkeypatch):
    """What the pipeline holds never passes the budget; an item larger than the budget runs alone."""
    peaks = []
    original = pipeline._Budget.acquire

    def acquire(self, amount):
        original(self, amount)
        peaks.append(self.held)

    monkeypatch.setattr(pipeline._Budget, "acquire", acquire)
    items = _items(30, 1000) + [pipeline.Item([("big", None)], ("sbig",), None, 9000, 9000, 9000)] + _items(5, 1000)
    items[5] = pipeline.Item([("copied", None)], ("s5",), "stored-at", 0, 0, 1000)
    sizes = {name: 1000 for item in items for name in item.sources} | {"sbig": 9000}
    writer, seen = _FakeWriter(), []
    pipeline.run_pipeline(_FakeView(sizes), writer, items, budget=5000, progress=seen.append)
    assert max(p for p in peaks if p != 18000) <= 5000 and 18000 in peaks  # the big item: alone
    assert writer.written["copied"] == "stored-at" and torch.equal(writer.written["big"], torch.ones(9000, dtype=torch.uint8))
    assert all(torch.equal(writer.written[f"t{i}"], torch.full((1000,), 2, dtype=torch.uint8)) for i in range(30) if i != 5)
    assert sum(seen) == sum(item.input_bytes for item in items)
    assert pipeline.pipeline_budget(items, largest=4000) == 18000
    assert pipeline.pipeline_budget(_items(3, 10), largest=10**12) == pipeline.PIPELINE_BYTES
    assert pipeline.pipeline_budget(_items(3, 10), largest=100) == 200


@pytest.mark.parametrize("stage", ["compute", "write", "read"])
def test_pipeline_errors_reach_the_caller_as_raised(stage):
    """The first error of any thread is raised in the caller with its own type; no thread is left running."""
    items = _items(40, 100)
    sizes = {name: 100 for item in items for name in item.sources}
    view, writer = _FakeView(sizes), _FakeWriter(fail_on="t17" if stage == "write" else None)
    if stage == "compute":
        items[17].outputs = [("t17", lambda t: (_ for _ in ()).throw(InputError("merging LoRA into 't17' gives NaN or Inf")))]
    if stage == "read":
        view.get = lambda name: (_ for _ in ()).throw(CheckpointError(f"x.safetensors: key {name!r}: the shard was truncated"))
    error = {"compute": InputError, "write": CheckpointError, "read": CheckpointError}[stage]
    before = threading.active_count()
    with pytest.raises(error):
        pipeline.run_pipeline(view, writer, items, budget=250)
    assert threading.active_count() == before
    assert "t39" not in writer.written


def test_pipeline_copies_beside_the_computation():
    """Unchanged tensors are copied by their own thread from the start, back to front: a computation
    that waits for the copy of a tensor planned after it finishes (when copies went through the
    computing thread in plan order, it waited for ever), and every tensor is written once with its
    own bytes."""
    copied_later = threading.Event()
    order = []

    class Writer(_FakeWriter):
        def copy_stored(self, name, stored, stop=None):
            order.append(name)
            super().copy_stored(name, stored)
            if name == "c4":
                copied_later.set()

    def waits(t):
        assert copied_later.wait(timeout=20), "the copies waited for the computation"
        return t + 1

    items = [pipeline.Item([(f"c{i}", None)], (f"cs{i}",), f"stored-{i}", 0, 0, 7) for i in range(3)]
    items += [pipeline.Item([("t", waits)], ("s",), None, 10, 10, 10)]
    items += [pipeline.Item([(f"c{i}", None)], (f"cs{i}",), f"stored-{i}", 0, 0, 7) for i in range(3, 5)]
    writer, seen = Writer(), []
    pipeline.run_pipeline(_FakeView({"s": 10}), writer, items, budget=100, progress=seen.append)
    assert order == ["c4", "c3", "c2", "c1", "c0"]
    assert {name: writer.written[name] for name in order} == {f"c{i}": f"stored-{i}" for i in range(5)}
    assert torch.equal(writer.written["t"], torch.full((10,), 2, dtype=torch.uint8))
    assert sum(seen) == 45


def test_pipeline_copy_error_reaches_the_caller():
    """A failed copy (a truncated source shard) is raised in the caller; the computation stops and
    no thread is left running."""
    class Writer(_FakeWriter):
        def copy_stored(self, name, stored, stop=None):
            raise CheckpointError("in/model.safetensors: source shard ended early while copying")

    items = _items(40, 100) + [pipeline.Item([("c", None)], ("cs",), "stored", 0, 0, 7)]
    sizes = {name: 100 for item in items for name in item.sources}
    before = threading.active_count()
    with pytest.raises(CheckpointError, match="ended early"):
        pipeline.run_pipeline(_FakeView(sizes), Writer(), items, budget=250)
    assert threading.active_count() == before


def test_output_pool_reuses_within_its_limit():
    """A tensor given back is handed out again for the same shape and dtype; what is lent plus what is
    kept stays within the limit (free tensors dropped, largest first); a tensor given back twice is
    kept once; tensors the pool did not lend are ignored."""
    pool = buffers.OutputPool(limit=10_000)
    first = pool.take((10, 100), torch.float32)  # 4000 bytes
    pointer = first.data_ptr()
    pool.give_back(first)
    pool.give_back(first)
    again = pool.take((100, 10), torch.float32)
    assert again.data_ptr() == pointer and again.shape == (100, 10) and pool.free_bytes == 0
    other = pool.take((1000,), torch.int8)
    assert other.data_ptr() != pointer and pool.lent_bytes == 5000
    pool.give_back(torch.empty(1000, dtype=torch.int8))  # never lent: ignored
    pool.give_back(again)
    pool.give_back(other)
    assert pool.free_bytes == 5000 and pool.lent_bytes == 0
    big = pool.take((7000,), torch.uint8)  # room: the 4000-byte tensor is dropped, the 1000-byte one kept
    assert pool.free_bytes == 1000 and pool.lent_bytes == 7000
    assert pool.take((1000,), torch.int8).data_ptr() == other.data_ptr() and big.numel() == 7000
    bf16 = pool.take((4, 4), torch.bfloat16)
    pool.give_back(bf16[1:])  # a view, not what was lent: ignored
    assert pool.free_bytes == 0
    lent = pool.lent_bytes
    del bf16  # dropped without being given back (an output split into views): no longer lent
    assert pool.lent_bytes == lent - 32


def test_blocked_merge_in_a_pipeline_reuses_its_outputs(monkeypatch):
    """merge-lora's blocked merge takes its outputs from the running pipeline's pool: consecutive
    same-shaped results share memory once written, and every written tensor holds its own merge."""
    g = torch.Generator().manual_seed(3)
    tensors = {f"w{i}": torch.randn(64, 48, generator=g).bfloat16() for i in range(6)}
    tensors |= {"a": torch.randn(4, 48, generator=g).bfloat16(), "b": torch.randn(64, 4, generator=g).bfloat16()}
    sources = SimpleNamespace(get=lambda source, key: tensors[key])
    ops = (SimpleNamespace(source="x", a="a", b="b", scale=0.5, kind="lora"),)
    pointers = []

    class Writer(_FakeWriter):
        def write(self, name, tensor, stop=None):
            pointers.append(tensor.data_ptr())
            super().write(name, tensor)

    items = [pipeline.Item([(f"o{i}", lambda t: merge_lora._blocked(t, ops, sources, "k"))], (f"w{i}",), None,
                           64 * 48 * 2, 64 * 48 * 2, 0) for i in range(6)]
    view = SimpleNamespace(get=lambda name: tensors[name])
    writer = Writer()
    pipeline.run_pipeline(view, writer, items, budget=64 * 48 * 2 * 2)
    for i in range(6):
        assert torch.equal(writer.written[f"o{i}"], ref.blocked_merge(tensors[f"w{i}"], ops, sources, "k"))
    assert len(set(pointers)) < 6


def _computed(name, shard_size=1):
    item = pipeline.Item([(name, lambda t: t)], (name,), None, shard_size, shard_size, shard_size)
    item.results = [(name, torch.zeros(1))]
    return item


def test_output_threads_take_work_for_shards_no_other_thread_writes():
    """Copies go back to front, each into a shard no other thread writes; a computed item comes first
    and goes into a shard no other computed item is being written into (a copy there does not stop
    it); a thread with nothing it may take waits until a shard is free; close() ends the work."""
    copies = [pipeline.Item([(name, None)], (name,), f"stored-{name}", 0, 0, 1) for name in ("a0", "b0", "c1", "d1", "e2")]
    outputs = pipeline._Outputs(copies, lambda name: int(name[1]))
    first, second, third = outputs.take(), outputs.take(), outputs.take()
    assert [item.outputs[0][0] for _shards, item in (first, second, third)] == ["e2", "d1", "b0"]
    x1, y1, z2 = _computed("x1"), _computed("y1"), _computed("z2")
    for item in (x1, y1, z2):
        outputs.put(item)
    assert outputs.take()[1] is x1  # shard 1 is being copied into: a computed item still goes
    assert outputs.take()[1] is z2  # y1 waits: x1 is being written into shard 1

    taken = []
    waiting = threading.Thread(target=lambda: taken.append(outputs.take()))
    waiting.start()
    waiting.join(0.3)
    assert waiting.is_alive()  # y1 (shard 1) and c1 (shard 1) wait for shard 1
    outputs.done(frozenset({1}), x1)
    waiting.join(5)
    assert taken[0][1] is y1
    for shards, item in (first, second, third, taken[0]):
        outputs.done(shards, item)
    outputs.close()
    assert outputs.take()[1].outputs[0][0] == "c1" and outputs.take()[1].outputs[0][0] == "a0"
    assert outputs.take() is None


def test_interleaved_goes_through_the_shards_side_by_side():
    """With two output threads the computation alternates between two runs of shards of about equal
    bytes (plan order within each); one thread, or one shard, keeps the plan order."""
    items = [_computed(f"{name}{shard}", 10) for shard, count in ((0, 6), (1, 3), (2, 3)) for name in "abcdef"[:count]]
    shard_of = lambda name: int(name[1])  # noqa: E731
    order = [item.outputs[0][0] for item in pipeline.interleaved(items, shard_of, 2)]
    assert order == ["a0", "a1", "b0", "b1", "c0", "c1", "d0", "a2", "e0", "b2", "f0", "c2"]
    assert pipeline.interleaved(items, shard_of, 1) == items
    assert pipeline.interleaved(items[:6], shard_of, 4) == items[:6]


def test_computed_items_are_written_into_two_shards_at_once(monkeypatch):
    """Two output threads write computed items into two shards at the same time, never two into one."""
    import time

    active, peak, lock = [], [0], threading.Lock()

    class Writer(_FakeWriter):
        def shard_of(self, name):
            return int(name[1:]) % 2

        def write(self, name, tensor, stop=None):
            with lock:
                assert self.shard_of(name) not in active
                active.append(self.shard_of(name))
                peak[0] = max(peak[0], len(active))
            time.sleep(0.01)
            with lock:
                active.remove(self.shard_of(name))
            super().write(name, tensor)

    items = _items(40, 100)
    for i, item in enumerate(items):  # the first 20 into shard 0 (even numbers), the last 20 into shard 1 (odd)
        item.outputs = [(f"t{2 * i if i < 20 else 2 * i + 1}", item.outputs[0][1])]
    sizes = {name: 100 for item in items for name in item.sources}
    writer = Writer()
    monkeypatch.setattr(pipeline, "output_threads", lambda: 2)
    pipeline.run_pipeline(_FakeView(sizes), writer, items, budget=2000)
    assert len(writer.written) == 40 and peak[0] == 2


def test_pipeline_with_several_copiers_writes_every_tensor_once(monkeypatch, tmp_path):
    """Several copier threads and the writer fill a real multi-shard output at once: the bytes equal
    what one thread at a time writes."""
    from internvl_tools.io.reader import CheckpointReader
    from internvl_tools.io.writer import CheckpointWriter
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(5)
    tensors = {f"t{i:02d}": torch.randn(64 + i, 96, generator=g).bfloat16() for i in range(24)}
    (tmp_path / "in").mkdir()
    save_file(tensors, str(tmp_path / "in" / "model.safetensors"), metadata={"format": "pt"})
    reader = CheckpointReader(tmp_path / "in")
    specs = reader.specs()

    def items():
        out = []
        for i, spec in enumerate(specs):
            if i % 3 == 0:  # computed: doubled
                out.append(pipeline.Item([(spec.name, lambda t: t * 2)], (spec.name,), None, spec.nbytes, spec.nbytes, spec.nbytes))
            else:
                out.append(pipeline.Item([(spec.name, None)], (spec.name,), reader.stored(spec.name), 0, 0, spec.nbytes))
        return out

    results = {}
    for copiers in (1, 3):
        monkeypatch.setattr(pipeline, "output_threads", lambda copiers=copiers: copiers)
        out = tmp_path / f"out{copiers}"
        with CheckpointWriter(out, specs, max_shard_size=40_000, inputs=[tmp_path / "in"]) as writer:
            assert len(writer.plan) > 3
            pipeline.run_pipeline(reader, writer, items(), budget=100_000)
            writer.finalize()
        results[copiers] = {p.name: p.read_bytes() for p in sorted(out.iterdir())}
    assert results[1] == results[3]
    back = CheckpointReader(tmp_path / "out3")
    for i, (name, tensor) in enumerate(tensors.items()):
        assert torch.equal(back.get(name), tensor * 2 if i % 3 == 0 else tensor)


class _SlowCopies(_FakeWriter):
    """Each copy runs until the pipeline's stop() says stop (at most 20 s), as a long copy_file_range would."""

    def copy_stored(self, name, stored, stop=None):
        import time

        from internvl_tools.io.writer import CopyStopped

        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if stop():
                raise CopyStopped
            time.sleep(0.01)
        self.written[name] = stored


def test_a_failure_stops_a_copy_in_the_middle():
    """A computation's error stops the copier inside its tensor (between pieces), not after it."""
    import time

    items = [pipeline.Item([("c", None)], ("cs",), "stored", 0, 0, 7)] + _items(3, 100)
    items[2].outputs = [("t1", lambda t: (_ for _ in ()).throw(InputError("merging LoRA into 't1' gives NaN or Inf")))]
    started, before = time.monotonic(), threading.active_count()
    with pytest.raises(InputError, match="NaN"):
        pipeline.run_pipeline(_FakeView({f"s{i}": 100 for i in range(3)}), _SlowCopies(), items, budget=1000)
    assert time.monotonic() - started < 10 and threading.active_count() == before


def test_ctrl_c_while_waiting_for_the_copiers():
    """A real Ctrl-C (SIGINT to the main thread) while the caller waits for the copiers (shard: the
    whole run) stops them between pieces and waits until they have returned before
    KeyboardInterrupt is raised: no thread keeps writing into files closed after it (a plain
    Thread.join() interrupted by a signal can report a running thread as finished, CPython gh-90882)."""
    import signal
    import time

    inside = []

    class Writer(_SlowCopies):
        def copy_stored(self, name, stored, stop=None):
            inside.append(name)
            try:
                time.sleep(0.2)  # the caller is waiting by now
                signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
                time.sleep(0.3)  # still copying when the signal is handled
                super().copy_stored(name, stored, stop)
            finally:
                inside.remove(name)

    writer, started = Writer(), time.monotonic()
    items = [pipeline.Item([(f"c{i}", None)], (f"cs{i}",), f"stored-{i}", 0, 0, 7) for i in range(3)]
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # Python's own Ctrl-C, whatever ran before
    try:
        with pytest.raises(KeyboardInterrupt):
            pipeline.run_pipeline(_FakeView({}), writer, items, budget=0)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert inside == []  # every copy had returned when KeyboardInterrupt reached the caller
    assert time.monotonic() - started < 10 and not writer.written
    deadline = time.monotonic() + 5
    while any(t.name.startswith("internvl-tools-") for t in threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not [t.name for t in threading.enumerate() if t.name.startswith("internvl-tools-")]


def test_a_split_output_is_computed_once_for_all_its_parts():
    """Written in the native layout, an original output split into parts (a fused qkv) is computed
    once per pipeline item, not once per part, and let go after its last part."""
    from internvl_tools.transforms.stream import _Shared, _split_part

    calls = []

    def merge(t):
        calls.append(1)
        return t * 2

    shared = _Shared(merge, 3)
    parts = [_split_part(shared, lambda t: t.chunk(3), i) for i in range(3)]
    source = torch.arange(6.0)
    assert [p(source).tolist() for p in parts] == [[0.0, 2.0], [4.0, 6.0], [8.0, 10.0]]
    assert len(calls) == 1 and shared.value is None
    other = torch.ones(6)
    assert parts[0](other).tolist() == [2.0, 2.0] and parts[1](torch.zeros(6)).tolist() == [0.0, 0.0]
    assert len(calls) == 3  # other source tensors: computed again
