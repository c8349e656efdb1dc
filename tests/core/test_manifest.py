"""Job manifests: the TOML a person writes, its signed form, and replays."""

from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pgpu.core import Identity, Kind, LocalProtocolError, PeerMisbehaved, Reason, encode, seal
from p2pgpu.core._manifest import (
    Manifest,
    ManifestError,
    ReplayGuard,
    manifest_from_toml,
    sign_manifest,
    verify_manifest,
)

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "jobs"
PAYER = "11111111111111111111111111111111"
ME = Identity(bytes(range(32)))
OTHER = Identity(bytes(range(1, 33)))
NOW = 1_700_000_000_000


def parse(text: str, *, payer: str | None = PAYER, seed: int = 1) -> Manifest:
    return manifest_from_toml(text, submitter=ME.peer_id, now_ms=NOW, rng=random.Random(seed), payer=payer)


MINIMAL = '[runtime]\ncommand = ["sh", "-c", "echo hi"]\n'


@pytest.mark.parametrize("name,members,quorum", [("hello", 1, 1), ("pair", 2, 1), ("replicated", 3, 2)])
def test_examples_parse_sign_and_verify(name: str, members: int, quorum: int) -> None:
    m = parse((EXAMPLES / f"{name}.toml").read_text())
    assert (m.name, m.members, m.quorum) == (name, members, quorum)
    sm = sign_manifest(ME, m)
    again = verify_manifest(sm.wire, now_ms=NOW + 1)
    assert again.manifest == m
    assert again.job_id == sm.job_id == sm.envelope.digest.hex()
    assert m.requirements.nodes == m.nodes and m.requirements.runtime == "process"


def test_defaults_and_inputs() -> None:
    m = parse(MINIMAL + '[inputs]\n"a.txt" = { text = "hé" }\n"b.bin" = { base64 = "AAEC" }\n'
              '"c.dat" = { sha256 = "' + "AB" * 32 + '", size_bytes = 5 }\n')
    assert (m.nodes, m.gpus_per_node, m.replicas, m.quorum, m.on_member_loss) == (1, 1, 1, 1, "fail")
    assert m.network is False and m.payer == PAYER and m.expires_at_ms == NOW + 600_000
    assert [(i.name, i.data) for i in m.inputs[:2]] == [("a.txt", "hé".encode()), ("b.bin", b"\0\1\2")]
    assert m.inputs[2].sha256 == "ab" * 32 and m.inputs[2].digest == "ab" * 32
    assert verify_manifest(sign_manifest(ME, m).wire, now_ms=NOW).manifest == m


def test_nonce_makes_each_submission_a_new_job() -> None:
    a, b = sign_manifest(ME, parse(MINIMAL, seed=1)), sign_manifest(ME, parse(MINIMAL, seed=2))
    assert a.job_id != b.job_id
    assert sign_manifest(ME, parse(MINIMAL, seed=1)).job_id == a.job_id  # same inputs, same id


@pytest.mark.parametrize(
    "text,field",
    [
        ("name = 3\n" + MINIMAL, "name"),
        ("colour = 'red'\n" + MINIMAL, "colour"),
        ("[runtime]\nkind = 'process'\n", "runtime.command"),
        ('[runtime]\ncommand = "echo hi"\n', "runtime.command"),
        ("[runtime]\ncommand = []\n", "runtime.command"),
        (MINIMAL + "kind = 'docker'\n", "runtime.kind"),
        (MINIMAL + "duration_s_max = 0\n", "runtime.duration_s_max"),
        (MINIMAL + "network = 'yes'\n", "runtime.network"),
        (MINIMAL + "env = { '1BAD' = 'x' }\n", "runtime.env.1BAD"),
        (MINIMAL + "env = { A = 1 }\n", "runtime.env"),
        (MINIMAL + "timeout = 3\n", "runtime.timeout"),
        (MINIMAL + "[requirements]\nnodes = 0\n", "requirements.nodes"),
        (MINIMAL + "[requirements]\nnodes = 65\n", "requirements.nodes"),
        (MINIMAL + "[requirements]\ngpus_per_node = 'two'\n", "requirements.gpus_per_node"),
        (MINIMAL + "[requirements]\ncompute_capability_min = '8'\n", "requirements.compute_capability_min"),
        (MINIMAL + "[requirements]\nvram_gb_min = 8\nmemory_mb_min = 8\n", "requirements.vram_gb_min"),
        (MINIMAL + "[verification]\nreplicas = 9\n", "verification.replicas"),
        (MINIMAL + "[verification]\nreplicas = 3\nquorum = 4\n", "verification.quorum"),
        (MINIMAL + "[verification]\non_member_loss = 'retry'\n", "verification.on_member_loss"),
        (MINIMAL + "[requirements]\nnodes = 16\n[verification]\nreplicas = 5\n", "verification.replicas"),
        (MINIMAL + "[payment]\npayer = 'not-an-address'\n", "payment.payer"),
        (MINIMAL + "[payment]\nprice_per_gpu_hour_max = -1\n", "payment.price_per_gpu_hour_max"),
        (MINIMAL + "[payment]\nprice_per_gpu_hour_max = 1.5\n", "payment.price_per_gpu_hour_max"),
        (MINIMAL + "[inputs]\n'../x' = { text = 'a' }\n", "inputs.../x"),
        (MINIMAL + "[inputs]\nx = { text = 'a', base64 = 'YQ==' }\n", "inputs.x"),
        (MINIMAL + "[inputs]\nx = { base64 = '***' }\n", "inputs.x.base64"),
        (MINIMAL + "[inputs]\nx = { sha256 = 'abc' }\n", "inputs.x"),
        (MINIMAL + "[inputs]\nx = { text = '" + "a" * 50_000 + "' }\n", "inputs.x"),
        ("expires_in_s = 0\n" + MINIMAL, "expires_in_s"),
        ("expires_in_s = 100000\n" + MINIMAL, "expires_in_s"),
        ("[runtime\n", "toml"),
    ],
)
def test_a_persons_mistake_names_the_field(text: str, field: str) -> None:
    with pytest.raises(ManifestError) as info:
        parse(text)
    assert info.value.field == field, str(info.value)
    assert str(info.value).startswith(field + ": ")


def test_payer_is_required_somewhere() -> None:
    with pytest.raises(ManifestError, match="payment.payer"):
        parse(MINIMAL, payer=None)
    assert parse(MINIMAL + f"[payment]\npayer = '{PAYER}'\n", payer=None).payer == PAYER


def test_oversized_manifest_is_refused_with_advice() -> None:
    inputs = "".join(f"f{i} = {{ text = '{'a' * 40_000}' }}\n" for i in range(2))
    with pytest.raises(ManifestError, match="sha256"):
        parse(MINIMAL + "[inputs]\n" + inputs)


def signed(**changes: object) -> bytes:
    m = replace(parse(MINIMAL), **changes)  # type: ignore[arg-type]
    return sign_manifest(ME, m).wire


def test_verify_rejects_expired_future_and_wrong_signer() -> None:
    wire = signed()
    with pytest.raises(PeerMisbehaved) as info:
        verify_manifest(wire, now_ms=NOW + 600_000)
    assert info.value.reason is Reason.EXPIRED
    with pytest.raises(PeerMisbehaved) as info:
        verify_manifest(wire, now_ms=NOW - 61_000)
    assert info.value.reason is Reason.NOT_YET_VALID
    body = parse(MINIMAL).to_obj()
    forged = seal(OTHER, Kind.MANIFEST, body).to_bytes()  # signed by someone else than "submitter"
    with pytest.raises(PeerMisbehaved) as info:
        verify_manifest(forged, now_ms=NOW)
    assert info.value.reason is Reason.SIGNER_MISMATCH


def test_verify_rejects_tampering_malformed_and_oversized() -> None:
    wire = bytearray(signed())
    i = wire.find(b"echo hi")
    wire[i] = ord("E")
    with pytest.raises(PeerMisbehaved) as info:
        verify_manifest(bytes(wire), now_ms=NOW)
    assert info.value.reason is Reason.BAD_SIGNATURE
    for bad, reason in [(b"", Reason.MALFORMED), (b"\xc1", Reason.MALFORMED),
                        (b"\x00" * (Kind.MANIFEST.bytes_max + 1), Reason.OVERSIZED),
                        (encode({"k": "advert", "v": 1, "b": b"", "s": b"", "g": b""}), Reason.WRONG_KIND)]:
        with pytest.raises(PeerMisbehaved) as info:
            verify_manifest(bad, now_ms=NOW)
        assert info.value.reason is reason
    body = parse(MINIMAL).to_obj()
    body["runtime"]["kind"] = "docker"
    with pytest.raises(PeerMisbehaved) as info:
        verify_manifest(seal(ME, Kind.MANIFEST, body).to_bytes(), now_ms=NOW)
    assert info.value.reason is Reason.BAD_SCHEMA and "runtime.kind" in info.value.detail


def test_replay_guard_refuses_until_expiry_and_is_bounded() -> None:
    guard = ReplayGuard(ids_max=2)
    guard.admit("a", NOW + 10, NOW)
    with pytest.raises(PeerMisbehaved) as info:
        guard.admit("a", NOW + 10, NOW + 5)
    assert info.value.reason is Reason.REPLAYED
    with pytest.raises(PeerMisbehaved) as info:
        guard.admit("b", NOW, NOW)
    assert info.value.reason is Reason.EXPIRED
    guard.admit("b", NOW + 20, NOW)
    with pytest.raises(PeerMisbehaved) as info:
        guard.admit("c", NOW + 20, NOW)
    assert info.value.reason is Reason.LIMIT_EXCEEDED
    guard.admit("c", NOW + 30, NOW + 10)  # "a" expired, its slot is free again
    assert "a" not in guard and "c" in guard and len(guard) == 2


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2048))
def test_any_bytes_verify_or_peer_misbehaved(data: bytes) -> None:
    try:
        verify_manifest(data, now_ms=NOW)
    except PeerMisbehaved:
        pass


_leaf = st.one_of(st.none(), st.booleans(), st.integers(-2, 2**64), st.text(max_size=20), st.binary(max_size=20))
_values = st.recursive(_leaf, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                      st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                       max_leaves=12)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_any_signed_body_verifies_or_peer_misbehaved(data: st.DataObject) -> None:
    """A correctly signed envelope with a mutated body: a Manifest or PeerMisbehaved."""
    body = parse(MINIMAL).to_obj()
    path = data.draw(st.sampled_from([("name",), ("nonce",), ("inputs",), ("requirements", "nodes"),
                                      ("runtime", "command"), ("runtime", "env"), ("payment", "payer"),
                                      ("verification", "quorum"), ("extra",), ("requirements",)]))
    target = body
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = data.draw(_values)
    try:
        wire = seal(ME, Kind.MANIFEST, body).to_bytes()
    except LocalProtocolError:  # our encoder refuses some drawn values (e.g. an oversized body)
        return
    try:
        verify_manifest(wire, now_ms=NOW)
    except PeerMisbehaved:
        pass


@pytest.mark.parametrize("name", ["hello", "pair", "replicated"])
async def test_examples_run_in_the_real_sandbox(name: str, tmp_path: Path) -> None:
    """Each example runs to exit 0 in bubblewrap, as a member would run it (rank 0)."""
    from p2pgpu.runtime import ClusterEnv, JobSpec, SandboxPolicy, check_sandbox, run_job

    why = check_sandbox(SandboxPolicy())
    if why is not None:
        pytest.skip(f"no sandbox here: {why}")
    m = parse((EXAMPLES / f"{name}.toml").read_text())
    work, inputs = tmp_path / "work", tmp_path / "in"
    work.mkdir()
    inputs.mkdir()
    for item in m.inputs:
        assert item.data is not None
        (inputs / item.name).write_bytes(item.data)
    cluster = None
    if m.nodes > 1:
        cluster = ClusterEnv(rank=0, world_size=m.nodes, members=tuple(f"peer{i}" for i in range(m.nodes)),
                             rendezvous_host="127.0.0.1", rendezvous_port=29500)
    spec = JobSpec(argv=m.command, work_dir=work, inputs_dir=inputs if m.inputs else None,
                   time_limit_ms=m.duration_s_max * 1000, memory_bytes_max=1 << 30, gpus=(), env=dict(m.env),
                   network=m.network, job_id="ab" * 32, cluster=cluster)
    lines: list[bytes] = []

    async def on_line(stream: str, line: bytes) -> None:
        lines.append(line)

    result = await run_job(spec, SandboxPolicy(), on_line=on_line)
    assert (result.reason, result.exit_code) == ("exited", 0), result
    expected = {"hello": b"hello from p2pgpu", "pair": b"rank 0 of 2",
                "replicated": b"cf9cbf1cdf2e360d152d2f9c64f74d9b8e85095aac0f4761f36d5f737163c7db"}[name]
    assert lines[0] == expected


@pytest.mark.parametrize("name", ["hello", "pair", "replicated"])
def test_a_document_gives_the_same_manifest_as_its_toml(name: str) -> None:
    import tomllib

    from p2pgpu.core._manifest import manifest_from_doc

    text = (EXAMPLES / f"{name}.toml").read_text()
    doc = tomllib.loads(text)
    assert manifest_from_doc(doc, submitter=ME.peer_id, now_ms=NOW, rng=random.Random(1), payer=PAYER) == parse(text)


@pytest.mark.parametrize(("doc", "field"), [
    ([1, 2], "manifest"),
    ("text", "manifest"),
    ({1: "x", "runtime": {"command": ["true"]}}, "1"),
    ({"runtime": {"command": ["true"]}, "requirements": {"nodes": 1.5}}, "requirements.nodes"),
    ({"runtime": {"command": ["true"]}, "requirements": {"nodes": True}}, "requirements.nodes"),
    ({"runtime": "sh"}, "runtime"),
])
def test_a_hostile_document_names_the_field(doc: object, field: str) -> None:
    from p2pgpu.core._manifest import manifest_from_doc

    with pytest.raises(ManifestError) as info:
        manifest_from_doc(doc, submitter=ME.peer_id, now_ms=NOW, rng=random.Random(1), payer=PAYER)
    assert info.value.field == field
