"""Job manifests at their edges (#19): every rule of a manifest on both sides
of its limit, with the field and the words a person sees; the wire decoder
fed hostile bodies (each refusal names the field, so it shows which of the
two layers that check a field refused); the time rules at their exact
instants; the replay guard at its bounds.  The signed bytes and the job id
are pinned in ``tests/data/vectors.json`` (``test_vectors.py``)."""

from __future__ import annotations

import random
from dataclasses import replace
from typing import Any

import msgpack
import pytest
from test_manifest import ME, MINIMAL, NOW, OTHER, PAYER, parse

from p2pgpu.core import Kind, PeerMisbehaved, Reason, decode, encode, seal
from p2pgpu.core._manifest import (
    JobInput,
    Manifest,
    ManifestError,
    ReplayGuard,
    TomlDepth,
    body_bytes_max,
    check_manifest_time,
    manifest_from_envelope,
    manifest_from_toml,
    parse_image_ref,
    sign_manifest,
    toml_depth,
    verify_manifest,
)

M = MINIMAL
SHA = "a" * 64
NAME_RULE = ("a file name of letters, digits, '.', '_', '-' (no slashes, not starting with '.'), "
             "at most 128 characters")

# text, field, message: what a person sees for each mistake.
MISTAKES: list[tuple[str, str, str, str]] = [
    ("name over 64", 'name = "' + "n" * 65 + '"\n' + M, "name", "at most 64 characters"),
    ("name not a string", "name = 3\n" + M, "name", "must be a string, not 3"),
    ("nodes 0", M + "[requirements]\nnodes = 0\n", "requirements.nodes", "between 1 and 64"),
    ("nodes 65", M + "[requirements]\nnodes = 65\n", "requirements.nodes", "between 1 and 64"),
    ("gpus 0", M + "[requirements]\ngpus_per_node = 0\n", "requirements.gpus_per_node", "between 1 and 16"),
    ("gpus 17", M + "[requirements]\ngpus_per_node = 17\n", "requirements.gpus_per_node", "between 1 and 16"),
    ("memory -1", M + "[requirements]\nmemory_mb_min = -1\n", "requirements.vram_gb_min", "out of range"),
    ("memory over", M + "[requirements]\nmemory_mb_min = 4194305\n", "requirements.vram_gb_min", "out of range"),
    ("vram over", M + "[requirements]\nvram_gb_min = 4097\n", "requirements.vram_gb_min", "out of range"),
    ("vram and memory", M + "[requirements]\nvram_gb_min = 8\nmemory_mb_min = 8\n", "requirements.vram_gb_min",
     "give vram_gb_min or memory_mb_min, not both"),
    ("vram a string", M + "[requirements]\nvram_gb_min = '8'\n", "requirements.vram_gb_min",
     "must be a whole number, not '8'"),
    ("17 models", M + "[requirements]\nmodels = [" + ",".join(['"m"'] * 17) + "]\n", "requirements.models",
     "at most 16 names of 1 to 64 characters"),
    ("empty model", M + '[requirements]\nmodels = [""]\n', "requirements.models",
     "at most 16 names of 1 to 64 characters"),
    ("model of 65", M + '[requirements]\nmodels = ["' + "m" * 65 + '"]\n', "requirements.models",
     "at most 16 names of 1 to 64 characters"),
    ("models a string", M + '[requirements]\nmodels = "H100"\n', "requirements.models", "must be a list of strings"),
    ("models ints", M + "[requirements]\nmodels = [1]\n", "requirements.models", "must be a list of strings"),
    ("17 regions", M + "[requirements]\nregions = [" + ",".join(['"r"'] * 17) + "]\n", "requirements.regions",
     "at most 16 names of 1 to 32 characters"),
    ("region of 33", M + '[requirements]\nregions = ["' + "r" * 33 + '"]\n', "requirements.regions",
     "at most 16 names of 1 to 32 characters"),
    ("empty region", M + '[requirements]\nregions = [""]\n', "requirements.regions",
     "at most 16 names of 1 to 32 characters"),
    ("capability", M + "[requirements]\ncompute_capability_min = '8'\n", "requirements.compute_capability_min",
     "compute capability must look like '8.0', not '8'"),
    ("capability int", M + "[requirements]\ncompute_capability_min = 8\n",
     "requirements.compute_capability_min", "must be a string, not 8"),
    ("allow_simulated", M + '[requirements]\nallow_simulated = "no"\n', "requirements.allow_simulated",
     "must be true or false, not 'no'"),
    ("unknown requirement", M + "[requirements]\ngpu = 1\n", "requirements.gpu",
     ("unknown field; [requirements] takes allow_simulated, compute_capability_min, gpus_per_node, memory_mb_min, "
     "models, nodes, regions, vram_gb_min")),
    ("no command", "[runtime]\nkind = 'process'\n", "runtime.command",
     'missing: the argv to run, e.g. ["sh", "-c", "echo hello"]'),
    ("65 arguments", "[runtime]\ncommand = [" + ",".join(['"a"'] * 65) + "]\n", "runtime.command",
     'a list of 1 to 64 strings (the argv), e.g. ["sh", "-c", "echo hello"]'),
    ("no arguments", "[runtime]\ncommand = []\n", "runtime.command",
     'a list of 1 to 64 strings (the argv), e.g. ["sh", "-c", "echo hello"]'),
    ("empty argument", '[runtime]\ncommand = ["sh", ""]\n', "runtime.command",
     "each argument is 1 to 4096 characters"),
    ("argument of 4097", '[runtime]\ncommand = ["' + "a" * 4097 + '"]\n', "runtime.command",
     "each argument is 1 to 4096 characters"),
    ("kind", M + "kind = 'docker'\n", "runtime.kind", "one of process, ray, oci"),
    ("kind int", M + "kind = 1\n", "runtime.kind", "must be a string, not 1"),
    ("network", M + "network = 'no'\n", "runtime.network", "must be true or false, not 'no'"),
    ("65 variables", M + "env = {" + ",".join(f"A{i} = 'x'" for i in range(65)) + "}\n", "runtime.env",
     "at most 64 variables"),
    ("value of 4097", M + "env = { A = '" + "v" * 4097 + "' }\n", "runtime.env.A", "at most 4096 characters"),
    ("variable name", M + "env = { '1A' = 'x' }\n", "runtime.env.1A",
     "names are letters, digits and '_', not starting with a digit"),
    ("env a string", M + "env = 'A=1'\n", "runtime.env", 'must be a table of NAME = "value" strings'),
    ("env value int", M + "env = { A = '1', B = 2 }\n", "runtime.env", 'must be a table of NAME = "value" strings'),
    ("duration 0", M + "duration_s_max = 0\n", "runtime.duration_s_max", "between 1 and 604800 seconds"),
    ("duration over", M + "duration_s_max = 604801\n", "runtime.duration_s_max", "between 1 and 604800 seconds"),
    ("duration a string", M + "duration_s_max = '60'\n", "runtime.duration_s_max",
     "must be a whole number, not '60'"),
    ("runtime not a table", "runtime = 3\n", "runtime", "must be a [runtime] table"),
    ("unknown runtime field", M + "timeout = 3\n", "runtime.timeout",
     "unknown field; [runtime] takes command, duration_s_max, env, image, kind, network"),
    ("33 inputs", M + "[inputs]\n" + "".join(f"f{i} = {{ text = 'a' }}\n" for i in range(33)), "inputs",
     "at most 32 files"),
    ("inline total", M + "[inputs]\n" + "".join(f"f{i} = {{ text = '{'a' * 25_000}' }}\n" for i in range(2)),
     "inputs", "inline inputs total over 49152 bytes; pass large files by sha256"),
    ("one inline over", M + "[inputs]\nx = { text = '" + "a" * 49_153 + "' }\n", "inputs.x",
     "inline data is over 49152 bytes; pass it by sha256"),
    ("input field", M + "[inputs]\nx = { text = 'a', mode = 1 }\n", "inputs.x.mode", "unknown field"),
    ("input with none", M + "[inputs]\nx = { size_bytes = 1 }\n", "inputs.x",
     ('give exactly one of text = "...", base64 = "...", sha256 = "..." (with size_bytes, and url = "..." to fetch '
     'it from there), cid = "..." (with size_bytes and providers) or path = "..."')),
    ("input with two", M + "[inputs]\nx = { text = 'a', sha256 = '" + SHA + "' }\n", "inputs.x",
     ('give exactly one of text = "...", base64 = "...", sha256 = "..." (with size_bytes, and url = "..." to fetch '
     'it from there), cid = "..." (with size_bytes and providers) or path = "..."')),
    ("input not a table", M + "[inputs]\nx = 3\n", "inputs.x",
     ('give exactly one of text = "...", base64 = "...", sha256 = "..." (with size_bytes, and url = "..." to fetch '
     'it from there), cid = "..." (with size_bytes and providers) or path = "..."')),
    ("inputs not a table", "inputs = 3\n" + M, "inputs", "must be a table of file name = { text | base64 | sha256 | url | cid | path }"),
    ("size -1", M + "[inputs]\nx = { sha256 = '" + SHA + "', size_bytes = -1 }\n", "inputs.x",
     "size_bytes out of range"),
    ("size over", M + "[inputs]\nx = { sha256 = '" + SHA + "', size_bytes = 1099511627777 }\n", "inputs.x",
     "size_bytes out of range"),
    ("size a string", M + "[inputs]\nx = { sha256 = '" + SHA + "', size_bytes = '1' }\n", "inputs.x.size_bytes",
     "must be a whole number, not '1'"),
    ("short sha256", M + "[inputs]\nx = { sha256 = 'abc' }\n", "inputs.x", "sha256 must be 64 lowercase hex digits"),
    ("text int", M + "[inputs]\nx = { text = 1 }\n", "inputs.x.text", "must be a string, not 1"),
    ("bad base64", M + "[inputs]\nx = { base64 = '***' }\n", "inputs.x.base64", "is not valid base64"),
    ("name with ..", M + "[inputs]\n'a..b' = { text = 'a' }\n", "inputs.a..b", NAME_RULE),
    ("name with a dot first", M + "[inputs]\n'.a' = { text = 'a' }\n", "inputs..a", NAME_RULE),
    ("name with a slash", M + "[inputs]\n'a/b' = { text = 'a' }\n", "inputs.a/b", NAME_RULE),
    ("name of 129", M + "[inputs]\n'" + "a" * 129 + "' = { text = 'a' }\n", "inputs." + "a" * 129, NAME_RULE),
    ("price -1", M + "[payment]\nprice_per_gpu_hour_max = -1\n", "payment.price_per_gpu_hour_max",
     "a whole number of the currency's smallest units (lamports for SOL)"),
    ("price a float", M + "[payment]\nprice_per_gpu_hour_max = 1.5\n", "payment.price_per_gpu_hour_max",
     "must be a whole number, not 1.5"),
    ("empty currency", M + "[payment]\ncurrency = ''\n", "payment.currency", '"SOL" or an SPL token mint address'),
    ("currency of 65", M + "[payment]\ncurrency = '" + "c" * 65 + "'\n", "payment.currency",
     '"SOL" or an SPL token mint address'),
    ("payer int", M + "[payment]\npayer = 1\n", "payment.payer", "must be a string, not 1"),
    ("payer not an address", M + "[payment]\npayer = 'x'\n", "payment.payer",
     "a Solana address (base58) that pays for the job"),
    ("unknown payment field", M + "[payment]\nprice = 1\n", "payment.price",
     "unknown field; [payment] takes currency, interval_s, payer, price_per_gpu_hour_max"),
    ("replicas 0", M + "[verification]\nreplicas = 0\n", "verification.replicas", "between 1 and 8"),
    ("replicas 9", M + "[verification]\nreplicas = 9\n", "verification.replicas", "between 1 and 8"),
    ("quorum 0", M + "[verification]\nquorum = 0\n", "verification.quorum", "between 1 and replicas"),
    ("quorum over", M + "[verification]\nreplicas = 3\nquorum = 4\n", "verification.quorum",
     "between 1 and replicas"),
    ("65 members", M + "[requirements]\nnodes = 13\n[verification]\nreplicas = 5\n", "verification.replicas",
     "nodes x replicas must be at most 64"),
    ("on_member_loss", M + "[verification]\non_member_loss = 'retry'\n", "verification.on_member_loss",
     "one of fail, continue"),
    ("verification not a table", "verification = 3\n" + M, "verification", "must be a [verification] table"),
    ("expires 0", "expires_in_s = 0\n" + M, "expires_in_s", "between 1 and 86400 seconds"),
    ("expires over", "expires_in_s = 86401\n" + M, "expires_in_s", "between 1 and 86400 seconds"),
    ("expires a string", "expires_in_s = '1'\n" + M, "expires_in_s", "must be a whole number, not '1'"),
    ("memory a string", M + "[requirements]\nmemory_mb_min = '8'\n", "requirements.memory_mb_min",
     "must be a whole number, not '8'"),
    ("nodes a string", M + "[requirements]\nnodes = '2'\n", "requirements.nodes", "must be a whole number, not '2'"),
    ("regions a string", M + "[requirements]\nregions = 'eu'\n", "requirements.regions",
     "must be a list of strings"),
    ("command a string", '[runtime]\ncommand = "echo hi"\n', "runtime.command", "must be a list of strings"),
    ("currency int", M + "[payment]\ncurrency = 1\n", "payment.currency", "must be a string, not 1"),
    ("replicas a string", M + "[verification]\nreplicas = '2'\n", "verification.replicas",
     "must be a whole number, not '2'"),
    ("quorum a string", M + "[verification]\nquorum = '1'\n", "verification.quorum",
     "must be a whole number, not '1'"),
    ("on_member_loss int", M + "[verification]\non_member_loss = 1\n", "verification.on_member_loss",
     "must be a string, not 1"),
    ("base64 int", M + "[inputs]\nx = { base64 = 1 }\n", "inputs.x.base64", "must be a string, not 1"),
    ("sha256 int", M + "[inputs]\nx = { sha256 = 1 }\n", "inputs.x.sha256", "must be a string, not 1"),
    ("unknown top field", "colour = 1\n" + M, "colour",
     "unknown field; a manifest has expires_in_s, inputs, name, payment, requirements, runtime, verification"),
]


@pytest.mark.parametrize("text,field,message", [m[1:] for m in MISTAKES], ids=[m[0] for m in MISTAKES])
def test_each_mistake_names_its_field_in_words(text: str, field: str, message: str) -> None:
    with pytest.raises(ManifestError) as err:
        parse(text)
    assert (err.value.field, err.value.message) == (field, message)
    assert str(err.value) == f"{field}: {message}"


def test_a_toml_syntax_error_is_a_mistake_too() -> None:
    with pytest.raises(ManifestError) as err:
        parse("[runtime\n")
    assert err.value.field == "toml" and err.value.message.startswith("Expected ']'")


LIMITS_ACCEPTED: list[tuple[str, str, dict[str, Any]]] = [
    ("name of 64", 'name = "' + "n" * 64 + '"\n' + M, {"name": "n" * 64}),
    ("64 nodes", M + "[requirements]\nnodes = 64\n", {"nodes": 64, "members": 64}),
    ("16 GPUs", M + "[requirements]\ngpus_per_node = 16\n", {"gpus_per_node": 16}),
    ("memory at the max", M + "[requirements]\nmemory_mb_min = 4194304\n", {"memory_mb_min": 4_194_304}),
    ("vram in GB", M + "[requirements]\nvram_gb_min = 4096\n", {"memory_mb_min": 4_194_304}),
    ("memory in MB", M + "[requirements]\nmemory_mb_min = 7\n", {"memory_mb_min": 7}),
    ("16 models of 64", M + "[requirements]\nmodels = [" + ",".join(['"' + "m" * 64 + '"'] * 16) + "]\n",
     {"models": ("m" * 64,) * 16}),
    ("a model of 1", M + '[requirements]\nmodels = ["m"]\n', {"models": ("m",)}),
    ("16 regions of 32", M + "[requirements]\nregions = [" + ",".join(['"' + "r" * 32 + '"'] * 16) + "]\n",
     {"regions": ("r" * 32,) * 16}),
    ("64 arguments", "[runtime]\ncommand = [" + ",".join(['"a"'] * 64) + "]\n", {"command": ("a",) * 64}),
    ("an argument of 4096", '[runtime]\ncommand = ["' + "a" * 4096 + '"]\n', {"command": ("a" * 4096,)}),
    ("64 variables", M + "env = {" + ",".join(f"A{i} = 'x'" for i in range(64)) + "}\n",
     {"env": tuple(sorted((f"A{i}", "x") for i in range(64)))}),
    ("a value of 4096", M + "env = { _A = '" + "v" * 4096 + "' }\n", {"env": (("_A", "v" * 4096),)}),
    ("duration 1", M + "duration_s_max = 1\n", {"duration_s_max": 1}),
    ("duration a week", M + "duration_s_max = 604800\n", {"duration_s_max": 604_800}),
    ("32 inputs", M + "[inputs]\n" + "".join(f"f{i:02} = {{ text = 'a' }}\n" for i in range(32)),
     {"inputs": tuple(JobInput(name=f"f{i:02}", data=b"a") for i in range(32))}),
    ("inline total at the max", M + "[inputs]\n" + "".join(
        f"f{i} = {{ text = '{'a' * 24_576}' }}\n" for i in range(2)), {"members": 1}),
    ("size 0 and 2**40", M + "[inputs]\nx = { sha256 = '" + SHA + "' }\ny = { sha256 = '" + SHA.upper()
     + "', size_bytes = 1099511627776 }\n", {"inputs": (JobInput(name="x", sha256=SHA, size_bytes=0),
                                                       JobInput(name="y", sha256=SHA, size_bytes=1 << 40))}),
    ("a name of 128", M + "[inputs]\n'" + "a" * 128 + "' = { text = 'a' }\n",
     {"inputs": (JobInput(name="a" * 128, data=b"a"),)}),
    ("price at the max", M + "[payment]\nprice_per_gpu_hour_max = 9223372036854775807\n",
     {"price_per_gpu_hour_max": 2**63 - 1}),
    ("currency of 1 and of 64", M + "[payment]\ncurrency = 'c'\n", {"currency": "c"}),
    ("currency of 64", M + "[payment]\ncurrency = '" + "c" * 64 + "'\n", {"currency": "c" * 64}),
    ("8 replicas, quorum 8", M + "[verification]\nreplicas = 8\nquorum = 8\n", {"replicas": 8, "quorum": 8}),
    ("64 members", M + "[requirements]\nnodes = 8\n[verification]\nreplicas = 8\n", {"members": 64}),
    ("continue", M + "[verification]\non_member_loss = 'continue'\n", {"on_member_loss": "continue"}),
    ("expires 1", "expires_in_s = 1\n" + M, {"expires_at_ms": NOW + 1_000}),
    ("expires a day", "expires_in_s = 86400\n" + M, {"expires_at_ms": NOW + 86_400_000}),
]


@pytest.mark.parametrize("text,expect", [m[1:] for m in LIMITS_ACCEPTED], ids=[m[0] for m in LIMITS_ACCEPTED])
def test_each_limit_is_inclusive(text: str, expect: dict[str, Any]) -> None:
    m = parse(text)
    for key, value in expect.items():
        assert getattr(m, key) == value, key
    assert verify_manifest(sign_manifest(ME, m).wire, now_ms=NOW).manifest == m


def test_every_default_of_a_minimal_file() -> None:
    m = parse(M)
    assert m == Manifest(name="", submitter=ME.peer_id, created_at_ms=NOW, expires_at_ms=NOW + 600_000,
                         nonce=random.Random(1).randbytes(16), nodes=1, gpus_per_node=1, memory_mb_min=0, models=(),
                         compute_capability_min="0.0", regions=(), allow_simulated=True, runtime="process",
                         command=("sh", "-c", "echo hi"), env=(), network=False, duration_s_max=60, inputs=(),
                         price_per_gpu_hour_max=0, currency="SOL", payer=PAYER, replicas=1, quorum=1,
                         on_member_loss="fail")


def test_quorum_defaults_to_a_majority() -> None:
    for replicas, quorum in ((1, 1), (2, 2), (3, 2), (4, 3), (5, 3), (8, 5)):
        assert parse(M + f"[verification]\nreplicas = {replicas}\n").quorum == quorum


def test_every_field_of_a_full_file() -> None:
    text = ('name = "full"\nexpires_in_s = 30\n[requirements]\nnodes = 2\ngpus_per_node = 4\nvram_gb_min = 40\n'
            'models = ["H100", "A100"]\ncompute_capability_min = "8.0"\nregions = ["eu", "us"]\n'
            'allow_simulated = false\n[runtime]\nkind = "ray"\ncommand = ["python", "x.py"]\nnetwork = true\n'
            'duration_s_max = 90\nenv = { B = "2", A = "1" }\n[inputs]\n"x.py" = { text = "print(1)" }\n'
            '[payment]\nprice_per_gpu_hour_max = 5\ncurrency = "' + PAYER + '"\npayer = "' + PAYER + '"\n'
            '[verification]\nreplicas = 2\nquorum = 1\non_member_loss = "continue"\n')
    m = manifest_from_toml(text, submitter=ME.peer_id, now_ms=NOW, rng=random.Random(3), payer=None)
    assert m == Manifest(name="full", submitter=ME.peer_id, created_at_ms=NOW, expires_at_ms=NOW + 30_000,
                         nonce=random.Random(3).randbytes(16), nodes=2, gpus_per_node=4, memory_mb_min=40 * 1024,
                         models=("H100", "A100"), compute_capability_min="8.0", regions=("eu", "us"),
                         allow_simulated=False, runtime="ray", command=("python", "x.py"), env=(("A", "1"), ("B", "2")),
                         network=True, duration_s_max=90, inputs=(JobInput(name="x.py", data=b"print(1)"),),
                         price_per_gpu_hour_max=5, currency=PAYER, payer=PAYER, replicas=2, quorum=1,
                         on_member_loss="continue")
    assert m.members == 4
    r = m.requirements
    assert (r.nodes, r.gpus_per_node, r.memory_mb_min, r.models, r.compute_capability_min, r.price_per_gpu_hour_max,
            r.currency, r.regions, r.runtime, r.allow_simulated) == (
        2, 4, 40 * 1024, ("H100", "A100"), "8.0", 5, PAYER, ("eu", "us"), "ray", False)


def test_the_file_payer_wins_over_the_wallet() -> None:
    other = "4wBqpZM9xaSheZzJSMawUKKwhdpChKbZ5eu5ky4Vigw"
    assert parse(M + f"[payment]\npayer = '{other}'\n").payer == other
    with pytest.raises(ManifestError) as err:
        parse(M, payer="")
    assert (err.value.field, err.value.message) == (
        "payment.payer", "missing: name the Solana address that pays, or configure a wallet")


def test_an_oversized_manifest_says_how_big() -> None:
    inputs = "".join(f"f{i} = {{ sha256 = '{SHA}' }}\n" for i in range(32))
    env = "env = {" + ",".join(f"V{i} = '{'v' * 1_000}'" for i in range(64)) + "}\n"
    with pytest.raises(ManifestError) as err:
        parse(M + env + "[inputs]\n" + inputs)
    assert err.value.field == "inputs"
    size = int(err.value.message.split()[3])
    assert size > body_bytes_max and err.value.message == (
        f"the manifest is {size} bytes, over the {body_bytes_max} byte limit; pass large inputs by sha256")


# --- job inputs ------------------------------------------------------------------------


def test_a_manifest_of_exactly_the_size_limit_is_accepted() -> None:
    def sized(last: int) -> str:
        args = ", ".join(['"' + "a" * 3_900 + '"'] * 16 + ['"' + "b" * last + '"'])
        return f"[runtime]\ncommand = [{args}]\n"

    base = len(encode(parse(sized(1_000)).to_obj())) - 1_000
    exact = body_bytes_max - base
    assert len(encode(parse(sized(exact)).to_obj())) == body_bytes_max
    with pytest.raises(ManifestError) as err:
        parse(sized(exact + 1))
    assert err.value.message.startswith(f"the manifest is {body_bytes_max + 1} bytes")


def test_job_input_rules() -> None:
    assert JobInput(name="a", data=b"x").digest == "2d711642b726b04401627ca9fbac32f5c8530fb1903cc4db02258717921a4881"
    assert JobInput(name="a", sha256=SHA, size_bytes=3).digest == SHA
    assert JobInput(name="a", data=b"x").to_obj() == {"name": "a", "data": b"x"}
    assert JobInput(name="a", sha256=SHA, size_bytes=3).to_obj() == {"name": "a", "sha256": SHA, "size_bytes": 3}
    assert JobInput(name="a", data=b"x" * 49_152).data == b"x" * 49_152
    bad: list[tuple[dict[str, Any], str, str]] = [
        ({"name": "a", "data": b"x", "sha256": SHA}, "inputs.a", "give either inline data or sha256, not both"),
        ({"name": "a", "data": b"x", "size_bytes": 1}, "inputs.a", "give either inline data or sha256, not both"),
        ({"name": "a", "data": b"x" * 49_153}, "inputs.a", "inline data is over 49152 bytes; pass it by sha256"),
        ({"name": "a", "sha256": SHA.upper()}, "inputs.a", "sha256 must be 64 lowercase hex digits"),
        ({"name": "a", "sha256": SHA + "a"}, "inputs.a", "sha256 must be 64 lowercase hex digits"),
        ({"name": "..", "data": b""}, "inputs...", NAME_RULE),
        ({"name": "a..", "data": b""}, "inputs.a..", NAME_RULE),
        ({"name": "", "data": b""}, "inputs.", NAME_RULE),
    ]
    for fields, where, message in bad:
        with pytest.raises(ManifestError) as err:
            JobInput(**fields)
        assert (err.value.field, err.value.message) == (where, message)


# --- the wire decoder --------------------------------------------------------------------


def body_with(path: tuple[str, ...], value: Any, remove: bool = False) -> dict[str, Any]:
    body = parse(M + "[inputs]\nx = { text = 'a' }\ny = { sha256 = '" + SHA + "', size_bytes = 1 }\n").to_obj()
    target = body
    for key in path[:-1]:
        target = target[key]
    if remove:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return body


def refused(body: Any, signer: Any = ME) -> PeerMisbehaved:
    with pytest.raises(PeerMisbehaved) as err:
        verify_manifest(seal(signer, Kind.MANIFEST, body).to_bytes(), now_ms=NOW)
    return err.value


# the changed field, its value, the detail of the refusal (BAD_SCHEMA)
WIRE_REFUSED: list[tuple[tuple[str, ...], Any, str]] = [
    (("name",), "n" * 65, "name: length must be in [0, 64]"),
    (("submitter",), "", "submitter: length must be in [1, 64]"),
    (("submitter",), "s" * 65, "submitter: length must be in [1, 64]"),
    (("submitter",), "x", "submitter: not an Ed25519 peer id"),
    (("nonce",), b"\x00" * 15, "nonce: length must be in [16, 16]"),
    (("nonce",), b"\x00" * 17, "nonce: length must be in [16, 16]"),
    (("created_at_ms",), -1, "created_at_ms: must be in [0, "),
    (("expires_at_ms",), NOW, "expires_in_s: the manifest must expire after it is made"),
    (("expires_at_ms",), NOW + 86_400_001, "expires_in_s: at most 86400 s"),
    (("requirements", "nodes"), 0, "nodes: must be in [1, 64]"),
    (("requirements", "nodes"), 65, "nodes: must be in [1, 64]"),
    (("requirements", "gpus_per_node"), 0, "gpus_per_node: must be in [1, 16]"),
    (("requirements", "gpus_per_node"), 17, "gpus_per_node: must be in [1, 16]"),
    (("requirements", "memory_mb_min"), 4_194_305, "memory_mb_min: must be in [0, 4194304]"),
    (("requirements", "models"), ["m"] * 17, "models: must have between 0 and 16 items"),
    (("requirements", "models"), ["m" * 65], "models[0]: must be a string of 1 to 64 characters"),
    (("requirements", "compute_capability_min"), "10.100", "compute_capability_min: length must be in [0, 5]"),
    (("requirements", "compute_capability_min"), "8", "requirements.compute_capability_min: compute capability"),
    (("requirements", "regions"), ["r"] * 17, "regions: must have between 0 and 16 items"),
    (("requirements", "regions"), ["r" * 33], "regions[0]: must be a string of 1 to 32 characters"),
    (("requirements", "allow_simulated"), 1, "allow_simulated: must be a boolean"),
    (("requirements", "extra"), 1, "extra: unknown field"),
    (("runtime", "kind"), "k" * 17, "kind: length must be in [0, 16]"),
    (("runtime", "kind"), "docker", "runtime.kind: one of process, ray"),
    (("runtime", "command"), [], "runtime.command: a list of 1 to 64 strings"),
    (("runtime", "command"), ["a"] * 65, "command: must have between 0 and 64 items"),
    (("runtime", "command"), ["a" * 4097], "command[0]: must be a string of 1 to 4096 characters"),
    (("runtime", "env"), {f"A{i}": "x" for i in range(65)}, "runtime.env: at most 64 string values"),
    (("runtime", "env"), {"A": 1}, "runtime.env: at most 64 string values"),
    (("runtime", "env"), [], "env: must be a map"),
    (("runtime", "env"), {"1A": "x"}, "runtime.env.1A: names are letters"),
    (("runtime", "env"), {"A": "v" * 4097}, "runtime.env.A: at most 4096 characters"),
    (("runtime", "network"), 0, "network: must be a boolean"),
    (("runtime", "duration_s_max"), 0, "duration_s_max: must be in [1, 604800]"),
    (("runtime", "duration_s_max"), 604_801, "duration_s_max: must be in [1, 604800]"),
    (("inputs",), [{"name": "x", "data": b"a"}] * 33, "inputs: must have between 0 and 32 items"),
    (("inputs",), [3], "inputs[0]: must be a map"),
    (("inputs",), [{"name": "x", "data": b"a", "sha256": SHA}], "sha256: unknown field"),
    (("inputs",), [{"name": "x", "data": "a"}], "data: must be bytes"),
    (("inputs",), [{"name": "x", "data": b"a" * 49_153}], "data: length must be in [0, 49152]"),
    (("inputs",), [{"name": "n" * 129, "data": b""}], "name: length must be in [0, 128]"),
    (("inputs",), [{"name": "x", "sha256": SHA}], "size_bytes: missing"),
    (("inputs",), [{"name": "x", "sha256": SHA + "a", "size_bytes": 1}], "sha256: length must be in [0, 64]"),
    (("inputs",), [{"name": "x", "sha256": SHA.upper(), "size_bytes": 1}],
     "inputs.x: sha256 must be 64 lowercase hex digits"),
    (("inputs",), [{"name": "x", "sha256": SHA, "size_bytes": (1 << 40) + 1}],
     "size_bytes: must be in [0, 1099511627776]"),
    (("inputs",), [{"name": "x", "data": b"a"}, {"name": "x", "data": b"b"}], "inputs: file names must be unique"),
    (("inputs",), [{"name": "x", "data": b"a" * 30_000}, {"name": "y", "data": b"a" * 30_000}],
     "inputs: inline inputs total over 49152 bytes"),
    (("payment", "price_per_gpu_hour_max"), -1, "price_per_gpu_hour_max: must be in [0, "),
    (("payment", "currency"), "", "currency: length must be in [1, 64]"),
    (("payment", "currency"), "c" * 65, "currency: length must be in [1, 64]"),
    (("payment", "payer"), "p" * 65, "payer: length must be in [0, 64]"),
    (("payment", "payer"), "", "payment.payer: a Solana address"),
    (("verification", "replicas"), 0, "replicas: must be in [1, 8]"),
    (("verification", "replicas"), 9, "replicas: must be in [1, 8]"),
    (("verification", "quorum"), 0, "quorum: must be in [1, 8]"),
    (("verification", "quorum"), 2, "verification.quorum: between 1 and replicas"),
    (("verification", "on_member_loss"), "o" * 17, "on_member_loss: length must be in [0, 16]"),
    (("verification", "on_member_loss"), "retry", "verification.on_member_loss: one of fail, continue"),
    (("verification",), 3, "verification: must be a map"),
    (("runtime",), [], "runtime: must be a map"),
    (("extra",), 1, "extra: unknown field"),
]


@pytest.mark.parametrize("path,value,detail", WIRE_REFUSED, ids=[d for _, _, d in WIRE_REFUSED])
def test_wire_refusal_names_the_field(path: tuple[str, ...], value: Any, detail: str) -> None:
    err = refused(body_with(path, value))
    assert err.reason is Reason.BAD_SCHEMA
    assert err.detail.startswith(detail), err.detail


def test_wire_sections_must_be_complete() -> None:
    for path, field in ((("payment", "payer"), "payer"), (("runtime", "network"), "network"),
                        (("verification", "quorum"), "quorum"), (("requirements", "regions"), "regions"),
                        (("nonce",), "nonce")):
        assert refused(body_with(path, None, remove=True)).detail == f"{field}: missing"
    assert refused([1, 2]).detail == "body must be a map"
    with pytest.raises(PeerMisbehaved) as err:
        Manifest.from_obj([1, 2])
    assert err.value.detail == "manifest: must be a map"


def test_wire_takes_the_smallest_and_largest_values() -> None:
    for path, value in ((("name",), "n" * 64), (("submitter",), ME.peer_id), (("nonce",), b"\xff" * 16),
                        (("requirements", "nodes"), 64), (("requirements", "memory_mb_min"), 4_194_304),
                        (("requirements", "compute_capability_min"), "10.10"), (("runtime", "kind"), "ray"),
                        (("runtime", "env"), {f"A{i}": "x" for i in range(64)}), (("payment", "currency"), "c"),
                        (("runtime", "duration_s_max"), 604_800), (("verification", "quorum"), 1),
                        (("verification", "on_member_loss"), "continue"),
                        (("inputs",), [{"name": "n" * 128, "data": b"a" * 49_152}]),
                        (("inputs",), [{"name": "x", "sha256": SHA, "size_bytes": 1 << 40}])):
        sm = verify_manifest(seal(ME, Kind.MANIFEST, body_with(path, value)).to_bytes(), now_ms=NOW)
        assert sm.manifest.to_obj() == body_with(path, value), path


def test_signer_and_kind() -> None:
    err = refused(body_with(("name",), "x"), signer=OTHER)
    assert (err.reason, err.detail) == (Reason.SIGNER_MISMATCH, "manifest not signed by its submitter")
    env = seal(ME, Kind.ADVERT, parse(M).to_obj())
    with pytest.raises(PeerMisbehaved) as e:
        manifest_from_envelope(env)
    assert (e.value.reason, e.value.detail) == (Reason.WRONG_KIND, "expected manifest, got advert")
    with pytest.raises(PeerMisbehaved) as e:
        verify_manifest(env.to_bytes(), now_ms=NOW)
    assert (e.value.reason, e.value.detail) == (Reason.WRONG_KIND, "expected manifest, got advert")
    with pytest.raises(ValueError, match="a manifest is signed by its submitter"):
        sign_manifest(OTHER, parse(M))
    sm = sign_manifest(ME, parse(M))
    assert sm.manifest == parse(M) and sm.job_id == sm.envelope.digest.hex() and len(sm.job_id) == 64
    assert manifest_from_envelope(sm.envelope).manifest == sm.manifest


def test_decoder_refuses_non_canonical_and_oversized_bytes() -> None:
    wire = sign_manifest(ME, parse(M)).wire
    reordered = msgpack.packb(dict(reversed(list(decode(wire).items()))), use_bin_type=True)
    with pytest.raises(PeerMisbehaved) as err:
        verify_manifest(reordered, now_ms=NOW)
    assert err.value.reason is Reason.NON_CANONICAL
    obj = decode(wire)
    obj["s"] = b"\x00" * Kind.MANIFEST.bytes_max
    with pytest.raises(PeerMisbehaved) as err:
        verify_manifest(encode(obj), now_ms=NOW)
    assert err.value.reason is Reason.OVERSIZED


def test_time_rules_at_their_instants() -> None:
    sm = sign_manifest(ME, parse(M))  # made at NOW, expires at NOW + 600 s
    check_manifest_time(sm, NOW - 60_000)  # made up to the allowed skew in the future
    with pytest.raises(PeerMisbehaved) as err:
        check_manifest_time(sm, NOW - 60_001)
    assert (err.value.reason, err.value.detail) == (Reason.NOT_YET_VALID, "manifest made in the future")
    check_manifest_time(sm, NOW - 10, clock_skew_ms=10)
    with pytest.raises(PeerMisbehaved):
        check_manifest_time(sm, NOW - 11, clock_skew_ms=10)
    check_manifest_time(sm, NOW + 599_999)
    with pytest.raises(PeerMisbehaved) as err:
        check_manifest_time(sm, NOW + 600_000)
    assert (err.value.reason, err.value.detail) == (Reason.EXPIRED, "manifest has expired")
    with pytest.raises(PeerMisbehaved) as err:
        verify_manifest(sm.wire, now_ms=NOW - 60_001)
    assert err.value.reason is Reason.NOT_YET_VALID
    verify_manifest(sm.wire, now_ms=NOW - 70_000, clock_skew_ms=70_000)


def test_manifest_built_directly_checks_its_own_times() -> None:
    m = parse(M)
    for changes, field, message in (
            ({"created_at_ms": -1}, "expires_in_s", "the manifest must expire after it is made"),
            ({"expires_at_ms": NOW}, "expires_in_s", "the manifest must expire after it is made"),
            ({"expires_at_ms": NOW + 86_400_001}, "expires_in_s", "at most 86400 s"),
            ({"nonce": b"\x00" * 15}, "nonce", "must be 16 bytes"),
            ({"submitter": "x"}, "submitter", "not an Ed25519 peer id"),
            ({"env": (("B", "1"), ("A", "1"))}, "runtime.env", "variables must be unique"),
            ({"env": (("A", "1"), ("A", "2"))}, "runtime.env", "variables must be unique"),
            ({"price_per_gpu_hour_max": 2**63}, "payment.price_per_gpu_hour_max",
             "a whole number of the currency's smallest units (lamports for SOL)")):
        with pytest.raises(ManifestError) as err:
            replace(m, **changes)
        assert (err.value.field, err.value.message) == (field, message), changes
    assert replace(m, created_at_ms=0, expires_at_ms=86_400_000).created_at_ms == 0
    assert replace(m, expires_at_ms=NOW + 1).expires_at_ms == NOW + 1


# --- the replay guard ----------------------------------------------------------------------


def test_replay_guard_bounds() -> None:
    guard = ReplayGuard(ids_max=2)
    guard.admit("a", NOW + 1, NOW)  # expires one ms later: admitted
    assert "a" in guard and len(guard) == 1
    guard.prune(NOW)
    assert "a" in guard
    guard.prune(NOW + 1)  # expired at exactly its expiry
    assert "a" not in guard and len(guard) == 0
    guard.admit("a", NOW + 10, NOW + 1)  # admitted again once forgotten
    guard.admit("b", NOW + 10, NOW + 1)
    with pytest.raises(PeerMisbehaved) as err:
        guard.admit("c", NOW + 10, NOW + 1)
    assert (err.value.reason, err.value.detail) == (Reason.LIMIT_EXCEEDED, "too many live jobs to remember another")
    with pytest.raises(PeerMisbehaved) as err:
        guard.admit("a", NOW + 20, NOW + 2)
    assert (err.value.reason, err.value.detail) == (Reason.REPLAYED, "job a already seen")
    with pytest.raises(PeerMisbehaved) as err:
        guard.admit("z" * 64, NOW + 2, NOW + 2)
    assert (err.value.reason, err.value.detail) == (Reason.EXPIRED, "manifest has expired")


def test_replay_guard_pruning_keeps_a_readmitted_id() -> None:
    # An id admitted again after its first expiry keeps its new expiry: the
    # stale heap entry of the first admission must not forget it.
    guard = ReplayGuard(ids_max=10)
    guard.admit("a", NOW + 10, NOW)
    guard.prune(NOW + 10)
    guard.admit("a", NOW + 30, NOW + 10)
    guard._heap.append((NOW + 20, "a"))  # a stale entry for "a", as after a re-admission
    guard.prune(NOW + 20)
    assert "a" in guard
    guard.prune(NOW + 30)
    assert "a" not in guard
    assert ReplayGuard().ids_max == 100_000


# --- the TOML depth scan: where it points, and the ends of the text -------------------


@pytest.mark.parametrize(("text", "depth"), [
    ('a = """x\\\ny"""\nb = [[1]]\n', TomlDepth(nesting=2, nesting_line=3, key_dots=0, key_dots_line=1)),
    ('a = """x\ny\nz"""\nb = [[1]]', TomlDepth(nesting=2, nesting_line=4, key_dots=0, key_dots_line=1)),
    ("a = '''x\ny'''\nb = [1]", TomlDepth(nesting=1, nesting_line=3, key_dots=0, key_dots_line=1)),
    ('a = """\n\n"""\nx.y.z = 1', TomlDepth(nesting=0, nesting_line=1, key_dots=2, key_dots_line=4)),
    ('a = """x"""""\nb = [[[1]]]', TomlDepth(nesting=3, nesting_line=2, key_dots=0, key_dots_line=1)),
    ("a = 'x\nb = [1]", TomlDepth(nesting=1, nesting_line=2, key_dots=0, key_dots_line=1)),
], ids=["backslash-newline", "multi-line basic", "multi-line literal", "dots after a string",
        "two extra quotes", "unterminated single-line"])
def test_the_line_a_depth_is_reached_counts_lines_inside_strings(text: str, depth: TomlDepth) -> None:
    assert toml_depth(text) == depth


@pytest.mark.parametrize("text", ['a = """x"""', 'a = """abc', 'a = """abc\\', "a = '''abc", 'a = "abc\\'],
                         ids=["closed at the end", "unterminated", "a backslash last", "literal unterminated",
                              "basic backslash last"])
def test_a_string_at_the_very_end_of_the_text(text: str) -> None:
    assert toml_depth(text) == TomlDepth(nesting=0, nesting_line=1, key_dots=0, key_dots_line=1)


def test_a_deep_manifest_error_names_its_line() -> None:
    deep = 'a = """x\ny"""\nb = ' + "[" * 17 + "]" * 17 + "\n"
    with pytest.raises(ManifestError) as err:
        parse(deep + M)
    assert (err.value.field, err.value.message) == (
        "toml", "arrays or tables nested more than 16 levels deep (line 3); a manifest needs no more than three")


# --- inputs by tree or URL, and OCI images (#15) --------------------------------------

D = "cd" * 32
URL_RULE = "an http:// or https:// URL of at most 2048 characters, without credentials"
IMAGE_RULE = ("an image by digest: REGISTRY/NAME@sha256:<64 hex>, e.g. registry.example.org/team/pytorch@sha256:"
              "9f86...; tags are not accepted")

CONTENT_MISTAKES: list[tuple[str, str, str, str]] = [
    ("tree not hex", f'"a" = {{ sha256 = "{SHA}", size_bytes = 1, tree = "xyz" }}', "inputs.a.tree",
     "the chunk tree root: 64 lowercase hex digits"),
    ("tree of 63", f'"a" = {{ sha256 = "{SHA}", size_bytes = 1, tree = "{D[:63]}" }}', "inputs.a.tree",
     "the chunk tree root: 64 lowercase hex digits"),
    ("ftp url", f'"a" = {{ url = "ftp://h/x", sha256 = "{SHA}", size_bytes = 1 }}', "inputs.a.url", URL_RULE),
    ("url with credentials", f'"a" = {{ url = "https://u:p@h/x", sha256 = "{SHA}", size_bytes = 1 }}',
     "inputs.a.url", URL_RULE),
    ("url of 2049", '"a" = { url = "https://h/' + "x" * 2039 + f'", sha256 = "{SHA}", size_bytes = 1 }}',
     "inputs.a.url", URL_RULE),
    ("url without sha256", '"a" = { url = "https://h/x", size_bytes = 1 }', "inputs.a.sha256",
     "a URL input needs its sha256 (and size_bytes): what the URL serves is checked against them"),
    ("url with a tree", f'"a" = {{ url = "https://h/x", sha256 = "{SHA}", size_bytes = 1, tree = "{D}" }}',
     "inputs.a.tree", "a URL input is checked by its sha256; give no tree"),
    ("a local path", '"a" = { path = "x" }', "inputs.a.path",
     ("a local file is read and hashed by `p2pgpu job submit` (or the SDK's submit) on the submitter's machine; "
     "this form takes sha256 and size_bytes")),
    ("tree int", f'"a" = {{ sha256 = "{SHA}", size_bytes = 1, tree = 1 }}', "inputs.a.tree",
     "must be a string, not 1"),
    ("url int", f'"a" = {{ url = 1, sha256 = "{SHA}", size_bytes = 1 }}', "inputs.a.url", "must be a string, not 1"),
]


@pytest.mark.parametrize("body,field,message", [c[1:] for c in CONTENT_MISTAKES], ids=[c[0] for c in CONTENT_MISTAKES])
def test_content_inputs_name_their_field(body: str, field: str, message: str) -> None:
    with pytest.raises(ManifestError) as err:
        parse(M + "[inputs]\n" + body + "\n")
    assert (err.value.field, err.value.message) == (field, message)


def test_content_inputs_at_their_limits() -> None:
    url = "https://h/" + "x" * 2038  # 2048 characters
    m = parse(M + f'[inputs]\n"a" = {{ url = "{url}", sha256 = "{SHA.upper()}", size_bytes = 1 }}\n'
              f'"b" = {{ sha256 = "{SHA}", size_bytes = 2, tree = "{D.upper()}" }}\n')
    assert m.inputs == (JobInput(name="a", sha256=SHA, size_bytes=1, url=url),
                        JobInput(name="b", sha256=SHA, size_bytes=2, tree=D))
    assert m.to_obj()["inputs"] == [{"name": "a", "sha256": SHA, "size_bytes": 1, "url": url},
                                    {"name": "b", "sha256": SHA, "size_bytes": 2, "tree": D}]
    assert verify_manifest(sign_manifest(ME, m).wire, now_ms=NOW).manifest == m
    assert parse(M + '[inputs]\n"a" = { url = "http://h", sha256 = "' + SHA + '", size_bytes = 1 }\n').inputs[0].url \
        == "http://h"
    with pytest.raises(ManifestError) as err:
        JobInput(name="a", data=b"x", tree=D)
    assert err.value.message == "give either inline data or sha256, not both"
    with pytest.raises(ManifestError) as err:
        JobInput(name="a", data=b"x", url="https://h/x")
    assert err.value.message == "give either inline data or sha256, not both"


OCI = '[runtime]\nkind = "oci"\ncommand = ["true"]\n'


@pytest.mark.parametrize("ref,parts", [
    (f"localhost/a@sha256:{D}", ("localhost", "a", D)),
    (f"h:5/a__b--c.d/e@sha256:{D}", ("h:5", "a__b--c.d/e", D)),
    (f"a.b/{'x' * 436}@sha256:{D}", ("a.b", "x" * 436, D)),  # 512 characters
])
def test_image_references_at_their_limits(ref: str, parts: tuple[str, str, str]) -> None:
    assert parse_image_ref(ref) == parts
    assert parse(OCI + f'image = "{ref}"\n').image == ref


@pytest.mark.parametrize("ref,message", [
    (f"a.b/{'x' * 437}@sha256:{D}", IMAGE_RULE),  # 513 characters
    (f"a.b/x___y@sha256:{D}", IMAGE_RULE), (f"a.b/x@sha256:{D.upper()}", IMAGE_RULE),
    (f"a.b/x@sha256:{D}0", IMAGE_RULE), ("a.b/x:latest", IMAGE_RULE),
    (f"x/a@sha256:{D}", "'x' is not a registry host (name one with a dot, a port or localhost)"),
])
def test_image_references_refused(ref: str, message: str) -> None:
    with pytest.raises(ValueError) as err:
        parse_image_ref(ref)
    assert str(err.value) == message
    with pytest.raises(ManifestError) as merr:
        parse(OCI + f'image = "{ref}"\n')
    assert (merr.value.field, merr.value.message) == ("runtime.image", message)


def test_image_and_kind_go_together() -> None:
    with pytest.raises(ManifestError) as err:
        parse(M + f'image = "ghcr.io/a@sha256:{D}"\n')
    assert (err.value.field, err.value.message) == ("runtime.image", 'an image is run by kind = "oci"')
    with pytest.raises(ManifestError) as err:
        parse(OCI)
    assert (err.value.field, err.value.message) == ("runtime.image",
                                                    'kind = "oci" needs image = "REGISTRY/NAME@sha256:DIGEST"')
    m = parse(OCI + f'image = "ghcr.io/a@sha256:{D}"\n')
    assert m.to_obj()["runtime"]["image"] == m.image and "image" not in parse(M).to_obj()["runtime"]


@pytest.mark.parametrize("path,value,detail", [
    (("runtime", "image"), "", "image: length must be in [1, 512]"),
    (("runtime", "image"), "i" * 513, "image: length must be in [1, 512]"),
    (("inputs",), [{"name": "y", "sha256": SHA, "size_bytes": 1, "tree": D + "0"}], "tree: length must be in [0, 64]"),
    (("inputs",), [{"name": "y", "sha256": SHA, "size_bytes": 1, "url": "https://h/" + "x" * 2039}],
     "url: length must be in [0, 2048]"),
    (("inputs",), [{"name": "y", "sha256": SHA, "size_bytes": 1, "tree": "z" * 64}],
     "inputs.y.tree: the chunk tree root"),
    (("inputs",), [{"name": "y", "sha256": SHA, "size_bytes": 1, "url": "javascript:x"}],
     "inputs.y.url: an http:// or https:// URL"),
    (("inputs",), [{"name": "y", "sha256": SHA, "size_bytes": 1, "mode": 1}], "mode: unknown field"),
], ids=["empty image", "long image", "long tree", "long url", "tree not hex", "not a url", "unknown input field"])
def test_content_wire_refusals_name_the_field(path: tuple[str, ...], value: Any, detail: str) -> None:
    err = refused(body_with(path, value))
    assert err.reason is Reason.BAD_SCHEMA and err.detail.startswith(detail), err.detail


def test_a_dotted_key_too_long_is_refused_naming_the_toml() -> None:
    """Against ``check_toml_depth__mutmut_11`` (the field of this refusal)."""
    from p2pgpu.core._manifest import check_toml_depth

    with pytest.raises(ManifestError) as e:
        check_toml_depth("a.b.c.d.e.f.g.h = 1\n", 3)
    assert e.value.field == "toml" and "dotted key" in str(e.value)


def test_too_many_payment_intervals_name_payment_interval_s() -> None:
    """Against ``_check_manifest__mutmut_355``: a week-long job paid every 10 s
    would be 60,480 intervals (at most 4,096)."""
    text = M.replace("[runtime]\n", "[runtime]\nduration_s_max = 604800\n") + "[payment]\ninterval_s = 10\n"
    with pytest.raises(ManifestError) as e:
        parse(text)
    assert e.value.field == "payment.interval_s", e.value


def test_a_manifest_file_takes_the_callers_default_payment_interval() -> None:
    """Against ``manifest_from_toml__mutmut_12`` (the default not passed on):
    a job longer than the interval, with none given, is paid every
    ``interval_s_default`` seconds, the caller's (an operator's config), not
    the module's."""
    text = M.replace("[runtime]\n", "[runtime]\nduration_s_max = 3600\n")
    m = manifest_from_toml(text, submitter=ME.peer_id, now_ms=NOW, rng=random.Random(1), payer=PAYER,
                           interval_s_default=60)
    assert m.interval_s == 60
    assert parse(text).interval_s == 300  # the module's default
