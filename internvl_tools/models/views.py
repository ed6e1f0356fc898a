"""Views: any checkpoint through one interface, in the ORIGINAL layout's key names.

Every view has `folder`, `layout_name` ("original" or "native"), `keys()`, `spec(name)`,
`specs()`, `get(name)`, `stored(name)` (byte location, for tensors stored as they are),
`config()` (the original-layout config), `close()` and works as a context manager. Commands
work on original key names through a view and write outputs back in the input's layout
(transforms/stream.py translates output names through `link_for`).

- `CheckpointReader` (io/) is the view of an original-layout checkpoint;
- `NativeView` presents a transformers-native checkpoint (`convert --to hf` output or a
  published "-hf" checkpoint) in original key names through the links of models/native_map.py.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from ..errors import LayoutError
from ..io.reader import CheckpointReader, read_json, require_checkpoint_folder
from ..io.safetensors_format import TensorSpec
from .dialects import get_dialect
from .layout import UNPACKED_DTYPES, build_layout, check_config_matches, classify_key, llm_dialect
from .native_layout import is_native, modern_key, original_config, original_keys
from .native_map import PLAIN_FUSED, SIDECAR, Link, link_for_key, links

# config.json (original layout) -> {param: kind} of its on-disk format (models/native_map.py)
FusedKinds = Callable[[dict], dict[str, str]]


class NativeView:
    """A native-layout checkpoint seen in the original layout (see the module docstring).

    With `internvl_original.json` (written by `convert --to hf`) the original config and key
    order are exact; without it they are derived from the native config and keys."""

    layout_name = "native"

    def __init__(self, reader: CheckpointReader, *, native_dialect: bool = False, fused: FusedKinds | None = None):
        """`native_dialect`: the LLM is seen in the native layout's own dialect (e.g. Llama for
        a converted InternLM2) even when internvl_original.json says otherwise; the rest of
        the original config (template, image settings) still comes from it. Layer-by-layer
        quantization uses this: packed tensors cannot be split back into a fused wqkv.
        `fused(config)`: {param: kind} of the checkpoint's on-disk format, how a fused linear's
        quantized tensors merge (models/native_map.py; formats.views.open_view passes the
        format's); without it only float tensors merge and a quantized fused linear is refused.

        Raises LayoutError (one line) for keys that do not match the config, a fused linear
        quantized in part, or quantized tensors that cannot be merged."""
        self.reader, self.folder = reader, reader.folder
        native_config = reader.config()
        self.native_config = native_config
        sidecar = reader.folder / SIDECAR
        self._renamed = {modern_key(k): k for k in reader.keys()}  # legacy -hf prefixes
        native_derived = original_config(native_config, reader.folder)  # what config.json alone says
        if sidecar.exists():  # exact original config and key order (InternLM2 stays InternLM2)
            saved = read_json(sidecar)
            if not isinstance(saved, dict) or not isinstance(saved.get("config"), dict) or not isinstance(saved.get("keys"), list):
                raise LayoutError(f"{sidecar}: not the file `convert --to hf` writes (an object with config and keys); "
                                  "delete it to read the checkpoint from config.json alone")
            self._config, order = dict(saved["config"]), list(saved["keys"])
            self.remote_code = dict(saved.get("remote_code") or {})  # *.py files of the original folder
            self.sidecar_extra = {k: v for k, v in saved.items() if k not in ("config", "keys")}  # e.g. side_files
            self.sidecar = True
            self._check_sidecar_names(sidecar)
            if native_dialect and llm_dialect(self._config) != llm_dialect(native_derived):
                self._config["llm_config"], order = native_derived["llm_config"], []
        else:
            self._config, order = native_derived, []
            self.remote_code = {}
            self.sidecar_extra = {}
            self.sidecar = False
        if native_config.get("quantization_config") and not self._config.get("quantization_config"):
            self._config["quantization_config"] = native_config["quantization_config"]
        derived = original_keys(reader.keys(), get_dialect(llm_dialect(self._config)))
        present = set(derived)
        if self.sidecar:
            self._check_sidecar(sidecar, native_config, derived, order)
        keys = [k for k in order if k in present] + [k for k in derived if k not in set(order)]
        # errors name the file each config comes from, and the LLM section it has there
        origins = [(str(reader.folder / "config.json"), "text_config", native_derived)]
        if self.sidecar:
            origins.append((str(sidecar), "llm_config", self._config))
        where, section, _ = origins[-1]
        self._layout = build_layout(self._config, [TensorSpec(k, "BF16", ()) for k in keys], where=where, llm_section=section)
        if self._layout.lora:
            raise LayoutError(f"{reader.folder}: embedded LoRA adapters; merge them first with `internvl-tools merge-lora`")
        self.fused_kinds = fused(self._config) if fused is not None else PLAIN_FUSED
        self._links = {link.original: link for link in links(self._config, self._layout, adapt_v1=True, fused=self.fused_kinds)}
        self._keys = [k for k in keys if k in self._links]
        missing = [(link, n) for link in self._links.values() for n in link.natives if n not in self._renamed]
        if missing:
            link, name = missing[0]
            there = [n for n in link.natives if n in self._renamed]
            if there:  # e.g. q_proj left in bf16 while k_proj / v_proj are int8: wqkv cannot be rebuilt
                raise LayoutError(f"{reader.folder}: {there[0]!r} exists but {name!r} does not: the native parts of the fused "
                                  f"{link.original.rpartition('.')[0]} are stored differently (quantized in part?); quantize "
                                  f"or skip {', '.join(n.rpartition('.')[0] for n in link.natives)} together")
            raise LayoutError(f"{reader.folder}: native key {name!r} is missing ({len(missing)} missing); "
                              "the checkpoint is incomplete or its config.json does not match the weights")
        covered = {self._renamed[n] for link in self._links.values() for n in link.natives}
        extra = [k for k in reader.keys() if k not in covered]
        if extra:
            raise LayoutError(f"{reader.folder}: key {extra[0]!r} is not part of the checkpoint's InternVL layout "
                              f"({len(extra)} such keys); is {SIDECAR} from another checkpoint?")
        specs = self.specs()  # merged shapes: both configs are checked against the tensors themselves
        shapes = {spec.name: spec.shape for spec in specs}
        unpacked = {spec.name for spec in specs if spec.dtype in UNPACKED_DTYPES}
        for where, section, config in origins:
            check_config_matches(config, self._layout, shapes, where=where, llm_section=section, unpacked=unpacked)
        token, embed = native_config.get("image_token_id"), shapes.get(f"language_model.model.{self._layout.record.embed}.weight")
        if isinstance(token, int) and embed and len(embed) == 2 and not 0 <= token < embed[0]:
            raise LayoutError(f"{reader.folder / 'config.json'}: image_token_id is {token} but the embeddings have {embed[0]} rows "
                              f"(ids 0 .. {embed[0] - 1}); the config does not belong to these weights")

    def _check_sidecar_names(self, sidecar: Path) -> None:
        """The sidecar's template and LLM architecture must be supported; the error names
        internvl_original.json (the checks themselves say config.json, where they usually come from)."""
        from .templates import get_template

        try:
            llm_dialect(self._config)
            if "template" in self._config:
                get_template(self._config["template"])
        except LayoutError as exc:
            message = str(exc)
            raise LayoutError(f"{sidecar}: {message.removeprefix('config.json: ')}") from None

    @staticmethod
    def _check_sidecar(sidecar: Path, native_config: dict, derived: list[str], order: list[str]) -> None:
        """`internvl_original.json` must describe this folder, not another model of the same widths:
        its LLM must convert to config.json's text_config.model_type, and its original keys must be
        the ones this folder's native keys map to (qkv bias, q_norm, ... present in both or neither).
        Raises LayoutError naming the sidecar."""
        fix = "it comes from another checkpoint: delete it to read the folder from config.json alone"
        text = native_config.get("text_config") if isinstance(native_config.get("text_config"), dict) else {}
        saved = get_dialect(llm_dialect(read_json(sidecar)["config"]))
        if text.get("model_type") and saved.native_model_type != text["model_type"]:
            raise LayoutError(f"{sidecar}: its LLM is {saved.name} (native {saved.native_model_type!r}) but config.json's "
                              f"text_config.model_type is {text['model_type']!r}; {fix}")
        llm = read_json(sidecar)["config"].get("llm_config") or {}
        if saved.experts is not None:  # the routing fields both files carry must agree (transformers reads config.json's)
            e = saved.experts
            for name in (e.count, e.top_k, e.intermediate, e.norm_topk):
                if name in llm and name in text and llm[name] != text[name]:
                    raise LayoutError(f"{sidecar}: llm_config.{name} is {llm[name]!r} but config.json's text_config.{name} is "
                                      f"{text[name]!r}; make them agree (the value the weights were trained with) or {fix}")
        if not order:
            return
        def modules(keys):  # modules and biases: a quantized folder's sidecar may list weight for SCB, weight_packed, ...
            return {k.rpartition(".")[0] for k in keys} | {k for k in keys if k.endswith(".bias")}

        listed = modules([k for k in order if "rotary_emb" not in k])
        made = modules(derived)
        odd = sorted(listed - made) or sorted(made - listed)
        if odd:
            where = "lists" if odd[0] in listed else "does not list"
            raise LayoutError(f"{sidecar}: {where} {odd[0]!r}, which this folder's native tensors "
                              f"{'do not hold' if odd[0] in listed else 'make'} ({len(odd)} such keys); "
                              + ("the folder lacks that tensor (incomplete: re-create it) or " if odd[0] in listed else "") + fix)

    def keys(self) -> list[str]:
        return list(self._keys)

    def __contains__(self, name: str) -> bool:
        return name in self._links

    def __len__(self) -> int:
        return len(self._keys)

    def link(self, name: str) -> Link:
        """The link of an original key to its native key(s)."""
        try:
            return self._links[name]
        except KeyError:
            raise LayoutError(f"{self.folder}: no tensor named {name!r} (original layout)") from None

    def _native(self, native_name: str) -> str:
        return self._renamed[native_name]

    def spec(self, name: str) -> TensorSpec:
        link = self.link(name)
        if link.merge is None:
            native = self.reader.spec(self._native(link.natives[0]))
            return TensorSpec(name, native.dtype, native.shape)
        specs = [self.reader.spec(self._native(n)) for n in link.natives]
        if len({s.dtype for s in specs}) > 1:
            raise LayoutError(f"{self.folder}: the native parts of {name!r} have different dtypes "
                              f"({', '.join(f'{s.name} {s.dtype}' for s in specs)}); they cannot be one fused tensor "
                              "(quantized in part?); quantize or skip them together")
        return TensorSpec(name, specs[0].dtype, self._merged_shape(name, specs))

    def _merged_shape(self, name: str, specs: list[TensorSpec]) -> tuple[int, ...]:
        """The shape `link.merge` gives, from the parts' headers alone (no torch: inspect and
        shard stay torch-free): one part keeps its shape (v1's transposes and chunk swaps); a
        fused linear's parts of kind "same" / "shape" are one tensor's copies, "rows" ones stack
        their rows (models/native_map.py)."""
        if len(specs) == 1 or self.fused_kinds.get(name.rpartition(".")[2]) in ("same", "shape"):
            return tuple(specs[0].shape)
        rest = {tuple(s.shape[1:]) for s in specs}
        if len(rest) > 1 or not specs[0].shape:
            raise LayoutError(f"{self.folder}: the native parts of {name!r} have shapes "
                              f"{', '.join(f'{s.name} {list(s.shape)}' for s in specs)}, which do not stack by rows into one "
                              "fused tensor; the checkpoint is inconsistent")
        return (sum(s.shape[0] for s in specs), *specs[0].shape[1:])

    def specs(self) -> list[TensorSpec]:
        return [self.spec(k) for k in self._keys]

    def stored(self, name: str):
        """Byte location of a tensor stored unchanged (a rename); None when it is computed."""
        link = self.link(name)
        return self.reader.stored(self._native(link.natives[0])) if link.split is None else None

    def get(self, name: str):
        link = self.link(name)
        if link.merge is not None:
            self.spec(name)  # the parts must agree in dtype
        tensors = [self.reader.get(self._native(n)) for n in link.natives]
        return tensors[0] if link.merge is None else link.merge(*tensors)

    @property
    def total_bytes(self) -> int:
        return self.reader.total_bytes

    @property
    def shards(self):
        return self.reader.shards

    def config(self) -> dict:
        return self._config

    def close(self) -> None:
        self.reader.close()

    def __enter__(self) -> "NativeView":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class OriginalView(NativeView):
    """Former name of NativeView (a native checkpoint seen in the original layout)."""


def open_view(folder: str | os.PathLike[str], *, native_dialect: bool = False, fused: FusedKinds | None = None):
    """The checkpoint at `folder` as a view in original key names (see the module docstring).
    `fused`: see NativeView (formats.views.open_view passes the on-disk format's kinds).

    Raises CheckpointError / LayoutError (one line) for an unreadable folder or an unknown layout."""
    reader = CheckpointReader(require_checkpoint_folder(folder))
    try:
        config = reader.config()
        if is_native(config):
            return NativeView(reader, native_dialect=native_dialect, fused=fused)
    except BaseException:
        reader.close()
        raise
    reader.layout_name = "original"
    return reader


class LayoutWriter:
    """Writes original-layout tensors into a CheckpointWriter planned in `view`'s layout
    (renamed; fused tensors split), so layer-by-layer work can name tensors one way."""

    def __init__(self, view, writer):
        self.view, self.writer = view, writer
        self.native = getattr(view, "layout_name", "original") == "native"

    def _link(self, name: str) -> Link:
        return link_for(self.view, name) if self.native else Link(name, (name,), None, None)

    def specs(self, specs: list[TensorSpec]) -> list[TensorSpec]:
        """The planned specs of original-layout `specs`, in the view's layout."""
        import torch

        if not self.native:
            return list(specs)
        out = []
        for spec in specs:
            link = self._link(spec.name)
            if link.split is None:
                out.append(TensorSpec(link.natives[0], spec.dtype, spec.shape))
                continue
            parts = link.split(torch.empty(spec.shape, dtype=spec.torch_dtype, device="meta"))
            out += [TensorSpec(n, spec.dtype, tuple(p.shape)) for n, p in zip(link.natives, parts)]
        return out

    def names(self, name: str) -> list[str]:
        return list(self._link(name).natives)

    def write(self, name: str, tensor) -> None:
        link = self._link(name)
        parts = (tensor,) if link.split is None else link.split(tensor)
        for native, part in zip(link.natives, parts):
            self.writer.write(native, part.contiguous())

    def copy(self, name: str) -> None:
        """Copy an input tensor through unchanged (bytes in the kernel when it is a rename)."""
        link = self._link(name)
        stored = self.view.stored(name)
        if stored is not None:
            self.writer.copy_stored(link.natives[0], stored)
        else:
            self.write(name, self.view.get(name))

    def mark_written(self, names: list[str]) -> None:
        self.writer.mark_written([n for name in names for n in self.names(name)])


def native_output_names(view, name: str) -> tuple[str, ...]:
    """The key(s) an original-layout output tensor gets in the layout of `view`'s checkpoint."""
    if getattr(view, "layout_name", "original") == "original":
        return (name,)
    return link_for(view, name).natives


def stored_names(view, name: str) -> list[str]:
    """The checkpoint's own key(s) behind an original-layout key of `view`."""
    if getattr(view, "layout_name", "original") == "original":
        return [name]
    return [view._native(n) for n in view.link(name).natives]


def link_for(view, name: str) -> Link:
    """The link of an original key (existing or new, e.g. a quantized `qweight`) in a native view."""
    if name in view._links:
        return view._links[name]
    config = view.config()
    return link_for_key(config, classify_key(name, llm_dialect(config)), adapt_v1=True, fused=getattr(view, "fused_kinds", None))


def layout_name_of(folder: str | Path) -> str:
    """"native" or "original", from config.json alone."""
    return "native" if is_native(read_json(Path(folder) / "config.json")) else "original"
