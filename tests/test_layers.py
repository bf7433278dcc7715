"""The architecture, held by tests: one direction of dependency, light configs, no back doors,
and the few places that read a library's text or reach into its internals pinned to that library.

    workbench (CLI, demo launcher, benchmark, in-process grid, cohort generator)
        |                 |
      client (site)    server (coordinator)        never each other
        \\                 /
               common (data path, model, training, metrics, config schemas, protocol)
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"common": "dicomfl.common", "client": "dicomfl.client", "server": "dicomfl.server",
            "workbench": "dicomfl.workbench"}
# What each layer may import of dicomfl (besides itself).
ALLOWED = {
    "common": set(),
    "client": {"common"},
    "server": {"common"},
    "workbench": {"common", "client", "server"},
}


def imported_modules(source: str, package: str) -> list[tuple[int, str]]:
    """Every module an import statement names, anywhere in the file (function bodies too),
    with relative imports resolved against ``package``."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.append((node.lineno, mod))
            out += [(node.lineno, f"{mod}.{a.name}") for a in node.names if mod == "dicomfl"]
    return out


def package_of(path: Path) -> str:
    """The dotted package a file of the tree is in (``client/transport/x.py``: ``dicomfl.client.transport``)."""
    rel = path.relative_to(ROOT)
    return ".".join([PACKAGES[rel.parts[0]], *rel.parts[1:-1]])


def violations(layer: str, source: str, filename: str = "<string>", package: str | None = None) -> list[str]:
    """Imports in a file of ``layer`` (in ``package``, default the layer's top) that break the dependency rule."""
    bad = []
    for line, mod in imported_modules(source, package or PACKAGES[layer]):
        parts = mod.split(".")
        if parts[0] != "dicomfl" or len(parts) < 2 or parts[1] == layer:
            continue
        if parts[1] not in ALLOWED[layer]:
            bad.append(f"{filename}:{line}: {layer} imports {mod}")
    return bad


def test_the_dependency_rule_holds_in_the_tree():
    bad = []
    for layer in PACKAGES:
        for f in sorted((ROOT / layer).rglob("*.py")):
            bad += violations(layer, f.read_text(), str(f.relative_to(ROOT)), package_of(f))
    assert bad == []


@pytest.mark.parametrize("layer,line", [
    ("common", "import dicomfl.server"),
    ("common", "def f():\n    from dicomfl.client.trainer import SiteTrainer"),
    ("common", "from dicomfl import workbench"),
    ("client", "from dicomfl.server.checks import distance"),
    ("server", "from dicomfl.client import handler"),
    ("server", "from dicomfl.workbench.bench import Bench"),
])
def test_the_rule_catches_an_upward_or_sideways_import(layer, line):
    assert violations(layer, textwrap.dedent(line))


def test_relative_imports_are_resolved():
    assert violations("client", "from ..server import checks") and not violations("client", "from .trainer import x")


def _imports_torch(code: str) -> bool:
    r = subprocess.run([sys.executable, "-c", code + "\nimport sys; print('torch' in sys.modules)"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip().endswith("True")


def test_config_schemas_and_protocol_do_not_import_torch():
    assert not _imports_torch("import dicomfl.common.config, dicomfl.common.protocol, dicomfl.common.errors")


def test_the_command_line_starts_without_torch():
    assert not _imports_torch("import dicomfl.workbench.cli")


# ----------------------------------------------------------------- no test hooks in production code
BANNED = ["DICOMFL_TEST_FAULT", "DICOMFL_TORCH_THREADS", "def preload", "_preloaded", "in str(exc)",
          "coordinator ready\" not in", "\"already\" in"]


def test_no_test_hooks_or_message_matching_in_production_code():
    hits = []
    for layer in PACKAGES:
        for f in (ROOT / layer).rglob("*.py"):
            text = f.read_text()
            hits += [f"{f.relative_to(ROOT)}: {b}" for b in BANNED if b in text]
    assert hits == []


# ------------------------------------------------------- the adapters, pinned to the libraries
def test_pydicom_wording_the_decoder_adapter_reads():
    """dicomfl.common.decoders reads pydicom's messages: these are the ones it expects."""
    import warnings

    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.pixels import pixel_array

    from dicomfl.common import decoders
    from dicomfl.common import errors as E

    warnings.simplefilter("ignore")
    ds = pydicom.dcmread(get_testdata_file("JPEG-LL.dcm"))
    with pytest.raises(RuntimeError) as missing:  # pylibjpeg-libjpeg is deliberately not installed
        pixel_array(ds, decoding_plugin="pylibjpeg")
    assert decoders.MISSING_DEPENDENCIES in str(missing.value)
    assert decoders.decode_failure(missing.value, "x").reason == E.NO_DECODER
    short = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    short.PixelData = short.PixelData[:100]
    with pytest.raises(ValueError) as truncated:
        short.pixel_array
    assert decoders.decode_failure(truncated.value, "x").reason == E.TRUNCATED
    nodec = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    nodec.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.110"  # JPEG XL: no decoder exists
    with pytest.raises(NotImplementedError) as none:
        nodec.pixel_array
    assert decoders.decode_failure(none.value, "x").reason == E.NO_DECODER


def test_flower_message_the_registration_adapter_reads():
    from dicomfl.server.flwrcli import key_already_registered

    from flwr.supercore.error.base import ApiErrorCode
    from flwr.supercore.error.catalog import API_ERROR_MAP

    msg = API_ERROR_MAP[ApiErrorCode.PUBLIC_KEY_ALREADY_IN_USE].public_message
    assert msg == "Public key already in use."
    assert key_already_registered(msg) and not key_already_registered("The provided public key is not valid.")


def test_flower_internals_the_inprocess_grid_sets():
    """workbench/flower_adapter.py (for the in-process grid) sets Flower's TaskIdentity and stamps message ids. When Flower no
    longer needs the first (a Message can be built in a bare process) or stores ids elsewhere,
    this fails: drop or move the adapter."""
    code = textwrap.dedent("""
        from flwr.app import Message, RecordDict
        try:
            Message(RecordDict(), dst_node_id=1, message_type="train")
        except RuntimeError as e:
            print("needs-identity")
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.stdout.strip() == "needs-identity", r.stderr
    from flwr.app import Message, RecordDict

    from dicomfl.workbench.flower_adapter import stamp_message_id, task_identity

    task_identity()
    m = Message(RecordDict(), dst_node_id=1, message_type="train")
    assert m.metadata.message_id == ""
    stamp_message_id(m, "inproc-1")
    assert m.metadata.message_id == "inproc-1"


# ------------------------------------------------- Flower internals only in the Flower adapters
#: The one module per side that may use Flower beyond its public API (see each module's doc).
FLOWER_ADAPTERS = {"client/transport/flower_adapter.py", "server/flower_adapter.py", "workbench/flower_adapter.py"}
#: Flower's public API as dicomfl uses it: these modules, any name not starting with "_" ...
FLOWER_PUBLIC = {"flwr.app", "flwr.clientapp", "flwr.serverapp", "flwr.serverapp.strategy", "flwr.simulation"}


def _flower_common_names() -> frozenset[str]:
    """... and of ``flwr.common`` only the names it exports (``flwr.common.serde``,
    ``flwr.common.constant`` and the like are Flower's own plumbing)."""
    import flwr.common

    return frozenset(flwr.common.__all__)


def _not_flower_key(key, constants: dict) -> bool:
    """A ``sys.modules`` key that names a module outside Flower: a string literal, or a module-level
    name bound to one, that does not start with ``flwr``."""
    if isinstance(key, ast.Name):
        key = constants.get(key.id)
    return isinstance(key, ast.Constant) and isinstance(key.value, str) and key.value.split(".")[0] != "flwr"


def flower_internals(source: str, filename: str = "<string>") -> list[str]:
    """Where a file uses Flower beyond its public API: an import of another ``flwr`` module (its
    protobufs, the SuperNode, the SuperLink, supercore, ...), of an underscored name, of a
    ``flwr.common`` name it does not export; a write into an object's ``__dict__`` under a
    private key (how Flower's private fields are set); or a module looked up in ``sys.modules``
    (how a Flower module's attribute is replaced without importing it by name)."""
    bad, common_names = [], _flower_common_names()
    tree = ast.parse(source)
    constants = {t.id: n.value for n in tree.body if isinstance(n, ast.Assign) for t in n.targets
                 if isinstance(t, ast.Name) and isinstance(n.value, ast.Constant)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            bad += [f"{filename}:{node.lineno}: import {a.name}" for a in node.names
                    if a.name.split(".")[0] == "flwr" and a.name not in FLOWER_PUBLIC]
        elif isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").split(".")[0] == "flwr":
            mod, names = node.module, [a.name for a in node.names]
            if mod == "flwr":
                wrong = [n for n in names if f"flwr.{n}" not in FLOWER_PUBLIC]
            elif mod == "flwr.common":
                wrong = [n for n in names if n not in common_names or n.startswith("_")]
            elif mod in FLOWER_PUBLIC:
                wrong = [n for n in names if n.startswith("_")]
            else:
                wrong = names
            bad += [f"{filename}:{node.lineno}: from {mod} import {n}" for n in wrong]
        elif isinstance(node, ast.Subscript) and isinstance(node.value, ast.Attribute) \
                and node.value.attr == "__dict__" and isinstance(node.slice, ast.Constant) \
                and isinstance(node.slice.value, str) and node.slice.value.startswith("_"):
            bad += [f"{filename}:{node.lineno}: __dict__[{node.slice.value!r}]"]
        elif isinstance(node, ast.Attribute) and node.attr in ("get", "__getitem__") \
                and isinstance(node.value, ast.Attribute) and node.value.attr == "modules" \
                and isinstance(node.value.value, ast.Name) and node.value.value.id == "sys" \
                or isinstance(node, ast.Subscript) and isinstance(node.value, ast.Attribute) \
                and node.value.attr == "modules" and isinstance(node.value.value, ast.Name) \
                and node.value.value.id == "sys" and not _not_flower_key(node.slice, constants):
            bad += [f"{filename}:{node.lineno}: a module from sys.modules"]
    return bad


def test_flower_internals_are_used_only_in_the_flower_adapters():
    bad = []
    for layer in PACKAGES:
        for f in sorted((ROOT / layer).rglob("*.py")):
            name = str(f.relative_to(ROOT))
            if name not in FLOWER_ADAPTERS:
                bad += flower_internals(f.read_text(), name)
    assert bad == []


def test_each_flower_adapter_is_in_the_tree_and_uses_flower_internals():
    """An adapter that no longer reaches into Flower is not an adapter: fold it back or drop it."""
    for name in sorted(FLOWER_ADAPTERS):
        assert flower_internals((ROOT / name).read_text(), name), name


@pytest.mark.parametrize("line", [
    "import flwr.supernode.start_client_internal as loop",
    "def f():\n    from flwr.supernode.cli import flower_supernode",
    "from flwr.supercore.task_identity import TaskIdentity",
    "from flwr.proto.runtime_pb2 import AcquireTaskRequest",
    "from flwr.common.serde import message_to_proto",
    "from flwr.common.constant import SubStatus",
    "from flwr.common import _private_thing",
    "from flwr.app import _internal",
    "from flwr.app.message import make_message",
    "from flwr.superlink.grid.http_grid import HttpGrid",
    "from flwr.server.superlink import fleet",
    "from flwr import supernode",
    "msg.metadata.__dict__['_message_id'] = 'x'",
    "module = sys.modules.get(type(grid).__module__)",
    "sys.modules['flwr.superlink.grid.http_grid'].pull_objects = f",
])
def test_the_flower_rule_catches_an_internal(line):
    assert flower_internals(textwrap.dedent(line))


@pytest.mark.parametrize("line", [
    "from flwr.app import ArrayRecord, Context, Message",
    "from flwr.clientapp import ClientApp",
    "from flwr.serverapp import Grid, ServerApp, strategy",
    "from flwr.serverapp.strategy import FedAvg",
    "from flwr.common import Message, ndarray_to_bytes",
    "from flwr import app",
    "'torch' in sys.modules",  # asking whether something is loaded reaches into nothing
    "_PKG = 'mine'\nsys.modules[_PKG] = object()",  # registering a module of one's own
    "sys.modules['mine.sub'] = object()",
    "from flwrapp import x",  # not Flower: another module whose name starts alike
])
def test_the_flower_rule_lets_the_public_api_pass(line):
    assert flower_internals(line) == []
