"""The manifest fields of issue 15: inputs by hash with a chunk-tree root, by
URL, local paths (resolved by the submitter), and ``runtime.image`` for
``kind = "oci"``; each with its hostile forms, from TOML and from the wire."""

from __future__ import annotations

from random import Random

import pytest

from p2pgpu.core import Identity, PeerMisbehaved, Reason, decode, encode
from p2pgpu.core._manifest import (
    Manifest,
    ManifestError,
    manifest_from_toml,
    parse_image_ref,
    sign_manifest,
    verify_manifest,
)

ID = Identity(bytes(32))
SHA = "ab" * 32
DIGEST = "cd" * 32


def parse(body: str) -> Manifest:
    text = f'[runtime]\ncommand = ["true"]\n{body}\n[payment]\npayer = "11111111111111111111111111111111"\n'
    return manifest_from_toml(text, submitter=ID.peer_id, now_ms=1000, rng=Random(1))


def test_inputs_by_hash_with_tree_and_by_url_round_trip_the_wire() -> None:
    m = parse(f'[inputs]\n"a.bin" = {{ sha256 = "{SHA}", size_bytes = 5, tree = "{DIGEST}" }}\n'
              f'"b.bin" = {{ url = "https://example.org/b.bin?x=1", sha256 = "{SHA}", size_bytes = 7 }}\n')
    a, b = m.inputs
    assert (a.tree, a.url, b.url) == (DIGEST, "", "https://example.org/b.bin?x=1")
    sm = sign_manifest(ID, m)
    again = verify_manifest(sm.wire, now_ms=1000).manifest
    assert again.inputs == m.inputs
    # A manifest without the new fields keeps its old wire form (same job ids as before).
    plain = parse(f'[inputs]\n"a.bin" = {{ sha256 = "{SHA}", size_bytes = 5 }}\n')
    assert set(plain.to_obj()["inputs"][0]) == {"name", "sha256", "size_bytes"}
    assert "image" not in plain.to_obj()["runtime"]


@pytest.mark.parametrize(("body", "field"), [
    (f'"a" = {{ sha256 = "{SHA}", size_bytes = 1, tree = "xyz" }}', "inputs.a.tree"),
    (f'"a" = {{ url = "ftp://h/x", sha256 = "{SHA}", size_bytes = 1 }}', "inputs.a.url"),
    (f'"a" = {{ url = "https://user:pw@h/x", sha256 = "{SHA}", size_bytes = 1 }}', "inputs.a.url"),
    (f'"a" = {{ url = "https://h/{"x" * 3000}", sha256 = "{SHA}", size_bytes = 1 }}', "inputs.a.url"),
    ('"a" = { url = "https://h/x", size_bytes = 1 }', "inputs.a.sha256"),
    (f'"a" = {{ url = "https://h/x", sha256 = "{SHA}", size_bytes = 1, tree = "{DIGEST}" }}', "inputs.a.tree"),
    ('"a" = { path = "data.bin" }', "inputs.a.path"),
    (f'"a" = {{ sha256 = "{SHA}", size_bytes = 1, colour = "red" }}', "inputs.a.colour"),
])
def test_bad_input_forms_name_the_field(body: str, field: str) -> None:
    with pytest.raises(ManifestError) as e:
        parse(f"[inputs]\n{body}\n")
    assert e.value.field == field, e.value


def test_oci_image_by_digest_only() -> None:
    text = (f'[runtime]\nkind = "oci"\nimage = "ghcr.io/org/pytorch@sha256:{DIGEST}"\ncommand = ["true"]\n'
            '[payment]\npayer = "11111111111111111111111111111111"\n')
    m = manifest_from_toml(text, submitter=ID.peer_id, now_ms=1000, rng=Random(1))
    assert m.runtime == "oci" and m.image.endswith(DIGEST)
    assert verify_manifest(sign_manifest(ID, m).wire, now_ms=1000).manifest.image == m.image
    assert parse_image_ref(f"127.0.0.1:5000/test/busybox@sha256:{DIGEST}") == ("127.0.0.1:5000", "test/busybox",
                                                                              DIGEST)
    for bad in ("ghcr.io/org/pytorch:latest", "ghcr.io/org/pytorch", f"pytorch@sha256:{DIGEST}",
                f"ghcr.io/Org/pytorch@sha256:{DIGEST}", f"ghcr.io/org/pytorch@sha256:{DIGEST[:-1]}",
                f"ghcr.io/../x@sha256:{DIGEST}", f"https://ghcr.io/x@sha256:{DIGEST}"):
        with pytest.raises(ManifestError) as e:
            manifest_from_toml(text.replace(f"ghcr.io/org/pytorch@sha256:{DIGEST}", bad), submitter=ID.peer_id,
                               now_ms=1000, rng=Random(1))
        assert e.value.field == "runtime.image", bad
    with pytest.raises(ManifestError, match="needs image"):
        manifest_from_toml(text.replace(f'image = "ghcr.io/org/pytorch@sha256:{DIGEST}"\n', ""),
                           submitter=ID.peer_id, now_ms=1000, rng=Random(1))
    with pytest.raises(ManifestError, match="kind"):
        manifest_from_toml(text.replace('kind = "oci"\n', ""), submitter=ID.peer_id, now_ms=1000, rng=Random(1))


def test_hostile_wire_forms_are_the_senders_fault() -> None:
    m = parse(f'[inputs]\n"a.bin" = {{ sha256 = "{SHA}", size_bytes = 5, tree = "{DIGEST}" }}\n')
    obj = m.to_obj()
    for mutate in (lambda o: o["inputs"][0].update(tree=5),
                   lambda o: o["inputs"][0].update(url="javascript:alert(1)"),
                   lambda o: o["inputs"][0].update(extra=1),
                   lambda o: o["runtime"].update(image="x" * 600),
                   lambda o: o["runtime"].update(image=f"ghcr.io/a@sha256:{DIGEST}")):  # image with kind process
        bad = decode(encode(obj))
        mutate(bad)
        with pytest.raises(PeerMisbehaved) as e:
            Manifest.from_obj(bad)
        assert e.value.reason is Reason.BAD_SCHEMA


CID = "bafybeibab2wcwb2grtmf2fcsj2er4etl75gvx4y2lhjjj6q5sz7pwkecz4"
PROV = "/ip4/127.0.0.1/tcp/4001/p2p/12D3KooWLoKqDBNEyzZ8eZ6xUkptMbLH6NvAxEJXP8nH7HomZ5eH"


def test_inputs_by_cid_round_trip_the_wire() -> None:
    m = parse(f'[inputs]\n"w.bin" = {{ cid = "{CID}", size_bytes = 3000000, providers = ["{PROV}"] }}\n'
              '"v0.bin" = { cid = "QmYwAPJzv5CZsnA625s3Xf2nemtYgPpHdWEz79ojWnPbdG", size_bytes = 1, '
              f'providers = ["{PROV}", "/dns4/ipfs.example.org/tcp/4001/p2p/{PROV.rsplit("/", 1)[1]}"] }}\n')
    v0, w = m.inputs
    assert (w.cid, w.size_bytes, w.providers, w.sha256) == (CID, 3000000, (PROV,), "")
    assert len(v0.providers) == 2
    assert verify_manifest(sign_manifest(ID, m).wire, now_ms=1000).manifest.inputs == m.inputs
    assert set(m.to_obj()["inputs"][1]) == {"name", "cid", "size_bytes", "providers"}


@pytest.mark.parametrize(("body", "field"), [
    (f'"a" = {{ cid = "bafyNOTACID", size_bytes = 1, providers = ["{PROV}"] }}', "inputs.a.cid"),
    (f'"a" = {{ cid = "zb2rhe5P4gXftAwvA4eXQ5HJwsER2owDyS9sKaQRRVQPn93bA", size_bytes = 1, providers = ["{PROV}"] }}',
     "inputs.a.cid"),
    (f'"a" = {{ cid = "{CID}", size_bytes = 0, providers = ["{PROV}"] }}', "inputs.a.size_bytes"),
    (f'"a" = {{ cid = "{CID}", providers = ["{PROV}"] }}', "inputs.a.size_bytes"),
    (f'"a" = {{ cid = "{CID}", size_bytes = "3", providers = ["{PROV}"] }}', "inputs.a.size_bytes"),
    (f'"a" = {{ cid = "{CID}", size_bytes = 1 }}', "inputs.a.providers"),
    (f'"a" = {{ cid = "{CID}", size_bytes = 1, providers = [] }}', "inputs.a.providers"),
    (f'"a" = {{ cid = "{CID}", size_bytes = 1, providers = [{", ".join([chr(34) + PROV + chr(34)] * 9)}] }}',
     "inputs.a.providers"),
    (f'"a" = {{ cid = "{CID}", size_bytes = 1, providers = ["/ip4/127.0.0.1/udp/4001/quic-v1"] }}',
     "inputs.a.providers[0]"),
    (f'"a" = {{ cid = "{CID}", size_bytes = 1, providers = ["/ip4/127.0.0.1/tcp/4001"] }}', "inputs.a.providers[0]"),
    (f'"a" = {{ cid = "{CID}", size_bytes = 1, providers = ["/unix/tmp/s/p2p/12D3KooWLoKq"] }}',
     "inputs.a.providers[0]"),
    (f'"a" = {{ cid = "{CID}", size_bytes = 1, providers = ["{PROV}"], sha256 = "{SHA}" }}', "inputs.a.sha256"),
    (f'"a" = {{ cid = "{CID}", size_bytes = 1, providers = "{PROV}" }}', "inputs.a.providers"),
])
def test_bad_cid_inputs_name_the_field(body: str, field: str) -> None:
    with pytest.raises(ManifestError) as e:
        parse(f"[inputs]\n{body}\n")
    assert e.value.field == field, e.value


def test_hostile_cid_inputs_on_the_wire_are_the_senders_fault() -> None:
    m = parse(f'[inputs]\n"a.bin" = {{ cid = "{CID}", size_bytes = 5, providers = ["{PROV}"] }}\n')
    obj = m.to_obj()
    for mutate in (lambda o: o["inputs"][0].update(cid="bafy" + "a" * 200),
                   lambda o: o["inputs"][0].update(cid="Qm123"),
                   lambda o: o["inputs"][0].update(providers=[PROV] * 9),
                   lambda o: o["inputs"][0].update(providers=["/ip4/10.0.0.1/tcp/1/p2p/" + "x" * 300]),
                   lambda o: o["inputs"][0].update(providers=[]),
                   lambda o: o["inputs"][0].update(sha256=SHA),
                   lambda o: o["inputs"][0].update(size_bytes=0)):
        bad = decode(encode(obj))
        mutate(bad)
        with pytest.raises(PeerMisbehaved) as e:
            Manifest.from_obj(bad)
        assert e.value.reason is Reason.BAD_SCHEMA, mutate


def test_a_cid_input_may_name_as_many_providers_as_the_limit() -> None:
    """Against ``_check_cid__mutmut_28`` (the limit itself is allowed)."""
    from p2pgpu.core._manifest import cid_providers_max

    provs = ", ".join([f'"{PROV}"'] * cid_providers_max)
    m = parse(f'[inputs]\n"a" = {{ cid = "{CID}", size_bytes = 1, providers = [{provs}] }}\n')
    assert len(m.inputs[0].providers) == cid_providers_max
