"""Reading model files: the one module that opens a model file a user gives, and
what each kind may run.

- Checkpoints and weights files (``.ckpt``, ``.pt``, ``.pth``): tensors only,
  ``torch.load(weights_only=True)`` (:func:`read_tensors`).
- ``torch.export`` programs (``.pt2``, :func:`load_program`): the archive is read
  into memory once and checked against what :func:`save_program` writes before
  PyTorch sees it. PyTorch turns several fields of the archive into code: the
  ``guards_code`` strings are ``exec()``-ed, shape expressions go through
  ``sympy.sympify`` (``eval``), a node's ``target`` is any attribute path under
  ``torch`` (``torch.from_file``, ``os.system`` reached through a submodule) or an
  operator such as ``aten.from_file`` / ``aten.save``, tree specs import modules,
  pickled entries and AOTInductor libraries are unpickled or ``dlopen``-ed. Only a
  program of plain ``aten`` operators on tensors is accepted: no guards, shape
  expressions of one batch symbol, tree specs of one image tensor in and one tensor
  out, tensors stored raw, every field and file known; node metadata (stack traces)
  is dropped. The checked content is written into a fresh archive in memory and
  only that is deserialized, so nothing read from the file is run.
- TorchScript (``.ts``) and whole pickled modules (export's ``model.pt``) are code:
  :func:`load_trusted_module` refuses them unless the user passed
  ``--trust-pickle``.
- ONNX: never read from the user; :func:`lightly_mcp.formats.runtimes.onnx_runner` runs
  only the file export has just written into a private temporary folder.

Every refusal is one line of at most 200 characters naming the file and the fix
(:func:`refusal`), raised as :class:`~lightly_mcp.errors.UnsafeCheckpointError`
(exit code 2).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import pickle
import re
import struct
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from torch import Tensor, nn

from lightly_mcp.errors import (
    MAX_MESSAGE,
    CheckpointError,
    CodeFileError,
    UnsafeCheckpointError,
    clipped,
)
from lightly_mcp.io.files import write_bytes_atomic

#: The flag that lets code files (TorchScript, pickled modules) be loaded.
TRUST_FLAG = "--trust-pickle"
#: The longest path shown in a message (longer ones keep their end).
_SHOWN_PATH = 60


# --- messages --------------------------------------------------------------------
def shown_path(path: str | os.PathLike[str]) -> str:
    """``path`` as messages show it: in full up to 60 characters, else its end.

    Examples:
        >>> shown_path("/runs/a/export/model.pt2")
        '/runs/a/export/model.pt2'
        >>> len(shown_path("x" * 300))
        60
    """
    text = str(path)
    if not text.isprintable():  # a newline would break the one-line message
        text = repr(text)[1:-1]
    return clipped(text, _SHOWN_PATH, keep_end=True)


def refusal(
    path: str | os.PathLike[str],
    problem: str,
    fix: str,
    error: type[CheckpointError] = UnsafeCheckpointError,
) -> CheckpointError:
    """The one-line error refusing a model file: ``'PATH' PROBLEM; FIX.``, cut to
    :data:`MAX_MESSAGE` characters by shortening the problem, never the fix.

    Examples:
        >>> str(refusal("m.pt2", "is truncated", "export it again"))
        "'m.pt2' is truncated; export it again."
    """
    head, tail = f"'{shown_path(path)}' ", f"; {fix}."
    room = MAX_MESSAGE - len(head) - len(tail)
    problem = clipped(" ".join(problem.split()), room)
    return error(head + problem + tail)


# --- tensors -----------------------------------------------------------------------
def read_tensors(
    path: str | os.PathLike[str],
    fix: str = "use a checkpoint or state_dict of tensors that lightly-mcp can read",
) -> Any:
    """What a checkpoint or weights file holds, read as data
    (``torch.load(weights_only=True)``): tensors and plain containers only.

    Args:
        path: The file (it must exist).
        fix: What the user should do instead, for the refusal.

    Raises:
        CodeFileError: If the file holds pickled Python objects (code).
        UnsafeCheckpointError: If it is truncated or not a PyTorch file.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "GLOBAL" in str(error) or "allowlisted" in str(error):  # code to call
            raise refusal(
                path,
                "cannot be read safely: unpickling it runs code",
                fix,
                CodeFileError,
            ) from None
        raise refusal(path, _corrupt("a PyTorch file"), fix) from None
    except (
        RuntimeError,
        EOFError,
        zipfile.BadZipFile,
        ValueError,
        OSError,
        struct.error,  # the unpickler reading past the end of a short file
        IndexError,
        KeyError,
        TypeError,
    ):
        raise refusal(path, _corrupt("a PyTorch file"), fix) from None


def _corrupt(kind: str) -> str:
    return f"cannot be read safely: truncated, corrupt or not {kind}"


# --- code files: TorchScript and pickled modules -----------------------------------
def load_trusted_module(path: str | os.PathLike[str], trusted: bool) -> nn.Module:
    """A TorchScript file (``.ts``) or a whole pickled ``nn.Module`` (any other
    suffix), loaded only when the user trusts it: both run code from the file.

    Raises:
        FileNotFoundError: If ``path`` is not a file.
        CodeFileError: Without ``trusted``.
        UnsafeCheckpointError: If the file does not load as a module.
    """
    path = Path(path)
    scripted = path.suffix == ".ts"
    if not path.is_file():
        from lightly_mcp.io.files import not_a_file

        kind = "TorchScript model" if scripted else "Model"
        raise FileNotFoundError(f"{kind} '{shown_path(path)}' {not_a_file(path)}.")
    fix = f"evaluate model.pt2 or a checkpoint, or pass {TRUST_FLAG} if you trust it"
    if not trusted:
        what = "it is TorchScript, which runs" if scripted else "unpickling it runs"
        raise refusal(path, f"cannot be read safely: {what} code", fix, CodeFileError)
    try:
        if scripted:
            module = torch.jit.load(str(path), map_location="cpu")
        else:
            module = torch.load(path, map_location="cpu", weights_only=False)
    except Exception:  # noqa: BLE001 - any unreadable file is refused
        kind = "a TorchScript file" if scripted else "a PyTorch file"
        raise refusal(path, _corrupt(kind), "export the model again") from None
    if not isinstance(module, nn.Module):
        raise refusal(
            path,
            f"does not hold a torch.nn.Module (it holds a {type(module).__name__})",
            "give the exported model.pt2 or a checkpoint",
            CheckpointError,
        )
    return module


# --- torch.export programs ---------------------------------------------------------
class _NotOurs(Exception):
    """A ``.pt2`` archive holds something :func:`load_program` does not accept."""


class ExportedNetwork(nn.Module):
    """A ``torch.export`` program's module, usable where an ``nn.Module`` is expected.

    The program was traced in eval mode and holds no train-mode behaviour:
    :meth:`train` only records the flag (the program's own module refuses it).
    """

    def __init__(self, program: torch.export.ExportedProgram) -> None:
        super().__init__()
        self.program = program.module()

    def train(self, mode: bool = True) -> ExportedNetwork:
        """Records ``mode``; the traced graph stays what it is (eval mode)."""
        self.training = mode
        return self

    def forward(self, x: Tensor) -> Tensor:
        """The program's output for the image batch ``x``."""
        out: Tensor = self.program(x)
        return out


def save_program(program: torch.export.ExportedProgram, path: str | Path) -> None:
    """Writes ``program`` to ``path`` (``.pt2``) atomically: never a partial file."""
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    write_bytes_atomic(Path(path), buffer.getvalue())


def load_program(path: str | Path) -> ExportedNetwork:
    """The network :func:`save_program` wrote, as a callable module (CPU), read
    without running anything from the file (see the module docstring).

    Raises:
        FileNotFoundError: If ``path`` is not a file.
        UnsafeCheckpointError: If the file is not a program of the form this
            project writes (truncated, another kind of file, or holding code).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No torch.export program at '{shown_path(path)}'.")
    fix = "export it again with lightly-mcp export"
    data = path.read_bytes()
    try:
        clean = _checked_archive(data)
    except (zipfile.BadZipFile, EOFError, ValueError, KeyError, OSError, RuntimeError):
        raise refusal(path, _corrupt("a torch.export program"), fix) from None
    except _NotOurs as why:
        raise refusal(
            path, f"is not a program lightly-mcp writes ({why})", fix
        ) from None
    try:
        with _no_pickled_code():
            program = torch.export.load(io.BytesIO(clean))
        return ExportedNetwork(program)
    except Exception:  # noqa: BLE001 - anything unreadable is refused
        raise refusal(path, _corrupt("a torch.export program"), fix) from None


class _Refused:
    """Stands in for the unpickling functions while a program is loaded."""

    @staticmethod
    def loads(*args: Any, **kwargs: Any) -> Any:
        raise pickle.UnpicklingError("pickled objects are not loaded")


@contextlib.contextmanager
def _no_pickled_code() -> Iterator[None]:
    """``torch.load`` only with ``weights_only=True``, no other unpickling (a second
    line of defence: the checked archive has nothing pickled); torch.export's log of
    a failed load (a traceback) is silenced.
    """
    from torch.export.pt2_archive import _package

    weights_only = torch.load

    def load(*args: Any, **kwargs: Any) -> Any:
        kwargs["weights_only"] = True
        return weights_only(*args, **kwargs)

    # torch.export.load logs a failure with its traceback before raising it; the
    # caller refuses the file in one line instead.
    export_log = logging.getLogger("torch.export")
    level = export_log.level
    export_log.setLevel(logging.CRITICAL)
    try:
        with (
            mock.patch.object(torch, "load", load),
            mock.patch.object(_package, "pickle", _Refused),
            mock.patch.object(torch._C, "_pickle_load_obj", _Refused.loads),
        ):
            yield
    finally:
        export_log.setLevel(level)


# The files of an archive torch.export.save writes, under its one top folder.
_FIXED_FILES = {
    "archive_format",
    "archive_version",
    "byteorder",
    ".data/version",
    ".data/serialization_id",
    "models/model.json",
    "data/sample_inputs/model.pt",
    "data/weights/model_weights_config.json",
    "data/constants/model_constants_config.json",
}
_PAYLOAD = re.compile(r"(weight|tensor)_[0-9]{1,9}")
_PAYLOAD_FILE = re.compile(r"data/(weights/weight|constants/tensor)_[0-9]{1,9}")
# Names of tensors, nodes, symbols and arguments; dotted parameter names.
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,199}")
_DOTTED = re.compile(r"[A-Za-z0-9_]{1,200}(\.[A-Za-z0-9_]{1,200}){0,63}")
_SYMBOL = re.compile(r"s[0-9]{1,9}")
_TOKEN = re.compile(r"[A-Za-z0-9_.+]{1,64}")
# The shape expressions of a program with one dynamic batch axis: the batch symbol,
# integers and arithmetic, nothing that sympy would evaluate as Python.
_EXPR = re.compile(
    r"(Symbol\('s[0-9]{1,9}', positive=True, integer=True\)|s[0-9]{1,9}|[0-9]{1,12}"
    r"|[-+*/(), ]|FloorDiv|CeilToInt|Mod|Max|Min)*"
)
# A program's input (one image tensor, no keyword arguments) and output (one tensor).
_IN_SPEC = (
    '[1, {"type": "builtins.tuple", "context": "null", "children_spec": '
    '[{"type": "builtins.tuple", "context": "null", "children_spec": '
    '[{"type": null, "context": null, "children_spec": []}]}, '
    '{"type": "builtins.dict", "context": "[]", "children_spec": []}]}]'
)
_OUT_SPEC = '[1, {"type": null, "context": null, "children_spec": []}]'
# Operators whose string arguments are enumerations (an approximation, a mode).
_STRING_ENUMS = {
    "gelu",
    "gelu_",
    "div",
    "div_",
    "pad",
    "_convolution_mode",
    "conv1d",
    "conv2d",
    "conv3d",
    "scatter_reduce",
    "index_reduce",
    "searchsorted",
    "linalg_vector_norm",
    "upsample_bilinear2d",
    "upsample_nearest2d",
}
_OPERATORS = {"getitem", "add", "sub", "mul", "floordiv", "truediv", "mod", "neg"}
_ARGUMENT_KINDS = {
    "as_none",
    "as_tensor",
    "as_tensors",
    "as_optional_tensors",
    "as_int",
    "as_ints",
    "as_float",
    "as_floats",
    "as_bool",
    "as_bools",
    "as_string",
    "as_sym_int",
    "as_sym_ints",
    "as_scalar_type",
    "as_memory_format",
    "as_layout",
    "as_device",
    "as_int_lists",
    "as_float_lists",
}


def _checked_archive(data: bytes) -> bytes:
    """A fresh ``.pt2`` archive holding the checked content of ``data``.

    Raises:
        _NotOurs: For content that could run code or that this project
            never writes.
        zipfile.BadZipFile, ValueError, KeyError: For a damaged file.
    """
    from torch.export.pt2_archive._package import PT2ArchiveWriter

    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        names = archive.namelist()
        if any(info.compress_type != zipfile.ZIP_STORED for info in archive.infolist()):
            # torch.export.save stores entries as they are: nothing to inflate
            raise _NotOurs("compressed entries")
        if len(set(names)) != len(names):
            raise _NotOurs("an archive entry appears twice")
        tops = {name.split("/", 1)[0] for name in names}
        if len(tops) != 1 or any("/" not in name for name in names):
            raise ValueError("not one top folder")
        (top,) = tops
        files = {name[len(top) + 1 :]: name for name in names}
        for name in files:
            if name not in _FIXED_FILES and not _PAYLOAD_FILE.fullmatch(name):
                raise _NotOurs(f"unknown entry '{name[:40]}'")
        if files.get("archive_format") is None or "models/model.json" not in files:
            raise ValueError("not a torch.export archive")

        def read(name: str) -> bytes:
            return archive.read(files[name])

        if read("archive_format") != b"pt2" or read("byteorder") != b"little":
            raise _NotOurs("another archive format or byte order")
        model = _json(read("models/model.json"))
        _check_program(model)
        weights = _json(read("data/weights/model_weights_config.json"))
        constants = _json(read("data/constants/model_constants_config.json"))
        payloads = {}
        for config, folder in ((weights, "weights"), (constants, "constants")):
            for entry in _check_payloads(config):
                name = f"data/{folder}/{entry}"
                if name not in files:
                    raise ValueError(f"missing {name}")
                payloads[name] = read(name)
        version = read("archive_version")
        if "data/sample_inputs/model.pt" in files:
            _check_tensors(read("data/sample_inputs/model.pt"))
    buffer = io.BytesIO()
    with PT2ArchiveWriter(buffer) as writer:
        writer.write_bytes("archive_version", version)
        writer.write_string("byteorder", "little")
        writer.write_string("models/model.json", json.dumps(model))
        writer.write_bytes("data/sample_inputs/model.pt", b"")
        writer.write_string(
            "data/weights/model_weights_config.json", json.dumps(weights)
        )
        writer.write_string(
            "data/constants/model_constants_config.json", json.dumps(constants)
        )
        for name, payload in payloads.items():
            writer.write_bytes(name, payload)
    return buffer.getvalue()


def _check_tensors(data: bytes) -> None:
    """Refuses example inputs that are not plain tensors (they are dropped anyway)."""
    try:
        torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise _NotOurs("sample inputs that are pickled objects") from None


def _json(data: bytes) -> Any:
    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [key for key, _ in pairs]
        if len(set(keys)) != len(keys):
            raise _NotOurs("a JSON key appears twice")
        return dict(pairs)

    return json.loads(data.decode("utf-8"), object_pairs_hook=no_duplicates)


def _fields(
    value: Any, where: str, required: set[str], optional: frozenset[str] = frozenset()
) -> dict[str, Any]:
    """``value`` as a dict with the ``required`` keys and perhaps ``optional`` ones."""
    if not isinstance(value, dict):
        raise _NotOurs(f"{where} is not an object")
    unknown = set(value) - required - optional
    if unknown:
        raise _NotOurs(f"unknown field {where}.{sorted(unknown)[0][:40]}")
    missing = required - set(value)
    if missing:
        raise ValueError(f"missing field {where}.{sorted(missing)[0]}")
    return value


def _one(value: Any, where: str, allowed: set[str]) -> tuple[str, Any]:
    """The kind and content of a one-key union object."""
    if not isinstance(value, dict) or len(value) != 1:
        raise ValueError(f"{where} is not a union")
    ((kind, content),) = value.items()
    if kind not in allowed:
        raise _NotOurs(f"{where} of kind '{str(kind)[:30]}'")
    return kind, content


def _match(pattern: re.Pattern[str], value: Any, where: str) -> str:
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise _NotOurs(f"unexpected {where} '{str(value)[:40]}'")
    return value


def _ints(value: Any, where: str) -> None:
    if not isinstance(value, list) or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in value
    ):
        raise _NotOurs(f"{where} is not a list of numbers")


def _check_program(model: Any) -> None:
    """Refuses (:class:`_NotOurs`) anything in a program's ``model.json``
    that PyTorch would turn into code or that :func:`save_program` never writes;
    drops the nodes' metadata (stack traces and module paths, text only).
    """
    _fields(
        model,
        "program",
        {
            "graph_module",
            "opset_version",
            "range_constraints",
            "schema_version",
            "verifiers",
            "torch_version",
            "guards_code",
        },
    )
    if model["guards_code"] != []:
        raise _NotOurs("guards_code, Python that PyTorch would execute")
    _match(_TOKEN, model["torch_version"], "torch_version")
    for name, version in _fields(model["opset_version"], "opset", {"aten"}).items():
        if not isinstance(version, int):
            raise _NotOurs(f"opset {name}")
    schema = _fields(model["schema_version"], "schema", {"major", "minor"})
    for field in schema.values():
        if not isinstance(field, int):
            raise _NotOurs("schema_version")
    if not isinstance(model["verifiers"], list):
        raise _NotOurs("verifiers")
    for verifier in model["verifiers"]:
        _match(_NAME, verifier, "verifier")
    ranges = model["range_constraints"]
    if not isinstance(ranges, dict):
        raise _NotOurs("range_constraints")
    for symbol, bounds in ranges.items():
        _match(_SYMBOL, symbol, "symbol")
        for bound in _fields(bounds, "range", {"min_val", "max_val"}).values():
            if bound is not None and (type(bound) is not int):
                raise _NotOurs("a range bound is not an integer")
    module = _fields(
        model["graph_module"],
        "graph_module",
        {"graph", "signature", "module_call_graph", "metadata"},
        frozenset({"treespec_namedtuple_fields"}),
    )
    if module["metadata"] != {} or module.get("treespec_namedtuple_fields", {}) != {}:
        raise _NotOurs("graph_module metadata")
    _check_signature(module["signature"])
    _check_call_graph(module["module_call_graph"])
    _check_graph(module["graph"])


def _check_signature(signature: Any) -> None:
    _fields(signature, "signature", {"input_specs", "output_specs"})
    users = 0
    for spec in signature["input_specs"]:
        kind, content = _one(
            spec, "input", {"user_input", "parameter", "buffer", "tensor_constant"}
        )
        if kind == "user_input":
            users += 1
            _fields(content, "user_input", {"arg"})
            _tensor_argument(_one(content["arg"], "user input", {"as_tensor"})[1])
            continue
        name_field = {
            "parameter": "parameter_name",
            "buffer": "buffer_name",
            "tensor_constant": "tensor_constant_name",
        }[kind]
        extra = frozenset({"persistent"}) if kind == "buffer" else frozenset()
        _fields(content, kind, {"arg", name_field}, extra)
        _tensor_argument(content["arg"])
        _match(_DOTTED, content[name_field], f"{kind} name")
        if kind == "buffer" and not isinstance(content.get("persistent"), bool):
            raise _NotOurs("buffer persistent flag")
    if users != 1 or not isinstance(signature["output_specs"], list):
        raise _NotOurs("a program of other inputs than one image batch")
    for spec in signature["output_specs"]:
        _, content = _one(spec, "output", {"user_output"})
        _fields(content, "user_output", {"arg"})
        _tensor_argument(_one(content["arg"], "user output", {"as_tensor"})[1])
    if len(signature["output_specs"]) != 1:
        raise _NotOurs("a program of other outputs than one tensor")


def _tensor_argument(value: Any) -> None:
    _match(_NAME, _fields(value, "tensor argument", {"name"})["name"], "tensor name")


def _check_call_graph(entries: Any) -> None:
    if not isinstance(entries, list) or not entries:
        raise _NotOurs("module_call_graph")
    for index, entry in enumerate(entries):
        _fields(entry, "module_call_graph", {"fqn", "signature"})
        fqn, signature = entry["fqn"], entry["signature"]
        if index == 0:
            if fqn != "":
                raise _NotOurs("module_call_graph root")
            _fields(
                signature,
                "call signature",
                {"inputs", "outputs", "in_spec", "out_spec"},
                frozenset({"forward_arg_names"}),
            )
            if signature["in_spec"] != _IN_SPEC or signature["out_spec"] != _OUT_SPEC:
                raise _NotOurs("a tree spec other than one tensor in and out")
            if signature["inputs"] != [] or signature["outputs"] != []:
                raise _NotOurs("module_call_graph arguments")
            for name in signature.get("forward_arg_names") or []:
                _match(_NAME, name, "argument name")
        else:
            _match(_DOTTED, fqn, "module path")
            if signature is not None:
                raise _NotOurs("a submodule call signature")


def _check_graph(graph: Any) -> None:
    _fields(
        graph,
        "graph",
        {"inputs", "outputs", "nodes", "tensor_values"},
        frozenset(
            {
                "sym_int_values",
                "sym_bool_values",
                "sym_float_values",
                "custom_obj_values",
                "is_single_tensor_return",
            }
        ),
    )
    for field in ("sym_bool_values", "sym_float_values"):
        if graph.get(field, {}) != {}:
            raise _NotOurs(f"graph {field}")
    sym_ints = graph.get("sym_int_values", {})
    if not isinstance(sym_ints, dict):
        raise _NotOurs("graph sym_int_values")
    for name, value in sym_ints.items():
        _match(_NAME, name, "size name")
        _check_sym_int(value)
    if graph.get("custom_obj_values", {}) != {}:
        raise _NotOurs("custom objects (TorchBind), which run code")
    if graph.get("is_single_tensor_return", False) is not False:
        raise _NotOurs("graph is_single_tensor_return")
    for value in graph["inputs"] + graph["outputs"]:
        _tensor_argument(_one(value, "graph input", {"as_tensor"})[1])
    if not isinstance(graph["tensor_values"], dict):
        raise _NotOurs("tensor_values")
    for name, meta in graph["tensor_values"].items():
        _match(_NAME, name, "tensor name")
        _check_tensor_meta(meta)
    if not isinstance(graph["nodes"], list):
        raise _NotOurs("nodes")
    for node in graph["nodes"]:
        _check_node(node)


def _check_tensor_meta(meta: Any) -> None:
    _fields(
        meta,
        "tensor",
        {
            "dtype",
            "sizes",
            "requires_grad",
            "device",
            "strides",
            "storage_offset",
            "layout",
        },
    )
    for field in ("dtype", "layout"):
        if type(meta[field]) is not int:
            raise _NotOurs(f"tensor {field}")
    if not isinstance(meta["requires_grad"], bool):
        raise _NotOurs("tensor requires_grad")
    device = _fields(meta["device"], "device", {"type", "index"})
    _match(_NAME, device["type"], "device")
    if device["index"] is not None and type(device["index"]) is not int:
        raise _NotOurs("device index")
    if not isinstance(meta["sizes"], list) or not isinstance(meta["strides"], list):
        raise _NotOurs("tensor sizes")
    for size in [*meta["sizes"], *meta["strides"], meta["storage_offset"]]:
        _check_sym_int(size)


def _check_sym_int(value: Any) -> None:
    kind, content = _one(value, "size", {"as_int", "as_expr"})
    if kind == "as_int":
        if type(content) is not int:
            raise _NotOurs("a size that is not an integer")
        return
    _fields(content, "expression", {"expr_str"}, frozenset({"hint"}))
    if len(str(content["expr_str"])) > 200:
        raise _NotOurs("a shape expression over 200 characters")
    _match(_EXPR, content["expr_str"], "shape expression")
    hint = content.get("hint")
    if hint is not None and (
        not isinstance(hint, dict)
        or set(hint) != {"as_int"}
        or type(hint["as_int"]) is not int
    ):
        raise _NotOurs("shape hint")


def _check_node(node: Any) -> None:
    _fields(
        node,
        "node",
        {"target", "inputs", "outputs", "metadata"},
        frozenset({"is_hop_single_tensor_return", "name"}),
    )
    if node.get("is_hop_single_tensor_return") not in (None, False):
        raise _NotOurs("a higher-order operator")
    if node.get("name") is not None:
        _match(_NAME, node["name"], "node name")
    if not isinstance(node["metadata"], dict):
        raise _NotOurs("node metadata")
    node["metadata"] = {}  # stack traces and module paths: text, not needed to run
    strings = _check_target(node["target"])
    if not isinstance(node["inputs"], list) or not isinstance(node["outputs"], list):
        raise _NotOurs("node arguments")
    for named in node["inputs"]:
        _fields(named, "argument", {"name", "arg"}, frozenset({"kind"}))
        _match(_NAME, named["name"], "argument name")
        if named.get("kind") not in (None, 0, 1, 2):
            raise _NotOurs("argument kind")
        _check_argument(named["arg"], strings)
    for output in node["outputs"]:
        _check_argument(output, False)


def _check_target(target: Any) -> bool:
    """Refuses a node target other than a plain ``aten`` operator (or an
    ``operator`` function on sizes); whether its string arguments are allowed.
    """
    if not isinstance(target, str):
        raise _NotOurs("node target")
    parts = target.split(".")
    if len(parts) == 2 and parts[0] == "_operator" and parts[1] in _OPERATORS:
        return False
    if len(parts) != 5 or parts[:3] != ["torch", "ops", "aten"]:
        raise _NotOurs(f"operator {target[:60]}")
    name, overload = parts[3], parts[4]
    _match(_NAME, name, "operator")
    _match(_NAME, overload, "operator overload")
    try:
        op = getattr(getattr(torch.ops.aten, name), overload)
        schema = op._schema
    except (AttributeError, RuntimeError):
        raise _NotOurs(f"unknown operator {target[:60]}") from None
    takes_strings = any("str" in str(a.type) for a in schema.arguments)
    if takes_strings and name not in _STRING_ENUMS:
        raise _NotOurs(f"operator {target[10:60]} takes a string")
    return takes_strings


def _check_argument(value: Any, strings: bool) -> None:
    kind, content = _one(value, "argument", _ARGUMENT_KINDS)
    if kind == "as_tensor":
        _tensor_argument(content)
    elif kind == "as_tensors":
        for item in content if isinstance(content, list) else [None]:
            _tensor_argument(item)
    elif kind == "as_optional_tensors":
        for item in content if isinstance(content, list) else [None]:
            inner_kind, inner = _one(item, "optional tensor", {"as_tensor", "as_none"})
            if inner_kind == "as_tensor":
                _tensor_argument(inner)
    elif kind == "as_string":
        if not strings:
            raise _NotOurs("a string argument")
        _match(_NAME, content, "string argument")
    elif kind == "as_sym_int":
        _sym_int_argument(content)
    elif kind == "as_sym_ints":
        for item in content if isinstance(content, list) else [None]:
            _sym_int_argument(item)
    elif kind in ("as_ints", "as_floats"):
        _ints(content, kind)
    elif kind in ("as_int_lists", "as_float_lists"):
        for item in content if isinstance(content, list) else [None]:
            _ints(item, kind)
    elif kind == "as_bools":
        if not isinstance(content, list) or not all(
            isinstance(v, bool) for v in content
        ):
            raise _NotOurs("as_bools")
    elif kind == "as_device":
        device = _fields(content, "device", {"type", "index"})
        _match(_NAME, device["type"], "device")
    elif kind in ("as_int", "as_scalar_type", "as_memory_format", "as_layout"):
        if type(content) is not int:
            raise _NotOurs(kind)
    elif kind == "as_float":
        if not isinstance(content, (int, float)) or isinstance(content, bool):
            raise _NotOurs(kind)
    elif kind in ("as_bool", "as_none"):
        if not isinstance(content, bool):
            raise _NotOurs(kind)


_META = frozenset({"tensor_meta"})


def _sym_int_argument(value: Any) -> None:
    """A size argument: the name of a size in the graph, or an integer."""
    kind, content = _one(value, "size argument", {"as_name", "as_int"})
    if kind == "as_name":
        _match(_NAME, content, "size name")
    elif type(content) is not int:
        raise _NotOurs("a size argument that is not an integer")


def _check_payloads(config: Any) -> list[str]:
    """The payload files a weights or constants config names; refuses pickled
    entries and anything but raw tensors.
    """
    _fields(config, "payload config", {"config"})
    if not isinstance(config["config"], dict):
        raise _NotOurs("payload config")
    files = []
    for name, entry in config["config"].items():
        _match(_DOTTED, name, "tensor name")
        _fields(entry, "payload", {"path_name", "is_param", "use_pickle"}, _META)
        if entry["use_pickle"] is not False:
            raise _NotOurs("a pickled tensor or object, which runs code")
        if not isinstance(entry["is_param"], bool):
            raise _NotOurs("payload is_param")
        files.append(_match(_PAYLOAD, entry["path_name"], "payload file"))
        if "tensor_meta" not in entry:
            raise ValueError("payload without tensor_meta")
        _check_tensor_meta(entry["tensor_meta"])
    return files


def check_finite_weights(
    state: Mapping[str, Any], path: str | Path, what: str = "Checkpoint"
) -> None:
    """Refuses weights holding NaN or infinite values.

    Such a file (damaged, or written by a diverged run) would make the first
    training step's loss NaN, which would then be blamed on the learning rate.

    Args:
        state: Tensors by name (a state dict); other values are ignored.
        path: The file, for the message.
        what: How the message names the file (``Checkpoint``, ``weights file``).

    Raises:
        CheckpointError: Naming the file and the first non-finite tensor.
    """
    for name, value in state.items():
        if (
            isinstance(value, Tensor)
            and value.is_floating_point()
            and not bool(torch.isfinite(value).all())
        ):
            raise CheckpointError(
                f"{what} '{shown_path(path)}' holds NaN or infinite weights (in "
                f"'{name[-40:]}'): damaged or diverged, use another."
            )
