"""Known-answer vectors of the wire format (#19): ``tests/data/vectors.json``.

Every input of a hash or a signature that leaves a node is pinned here: peer
ids, the domain tags, the canonical bytes of each signed message (advert,
manifest, proof, co-signature, proposal, accept, receipt, member receipt,
challenge, challenge answer) and of its envelope, the hashes that name things
(job id, proof hash, certificate digest, output digest, checkpoint chain,
payout Merkle root and audit path, DHT keys, a challenge's matrix keys and
product commitment).
Ed25519 signatures are deterministic, so the signed bytes are pinned too.

A change of format must be a decision: it fails these tests until the vectors
are regenerated on purpose (``.venv/bin/python tests/core/test_vectors.py
--write``) and the change is documented in ``docs/protocol.md``.  Another
implementation can test itself against the same file: each entry gives its
inputs, the canonical body (hex), the envelope bytes (hex) and the hashes.
In the JSON, bytes are written as ``{"hex": "..."}``.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import base58
import nacl.signing
import pytest

from p2pgpu.core import Accept, Certificate, Identity, Kind, Proposal, decode, encode, open_envelope, seal
from p2pgpu.core._advert import Advert, GpuInfo, advert_key, class_key, sign_advert, verify_advert
from p2pgpu.core._challenge import (
    Challenge,
    ChallengeAnswer,
    commitment_of,
    decode_answer,
    decode_challenge,
    matrix_keys,
)
from p2pgpu.core._manifest import JobInput, Manifest, sign_manifest, verify_manifest
from p2pgpu.core._payout import inclusion_proof, memo_of_root, merkle_root, verify_inclusion
from p2pgpu.core._proof import (
    CheckpointChain,
    Cosign,
    Proof,
    chain_genesis,
    decode_cosign,
    decode_proof,
    output_digest,
    sign_cosign,
    sign_proof,
)
from p2pgpu.core._receipt import (
    MemberReceipt,
    Receipt,
    ReceiptLine,
    decode_member_receipt,
    decode_receipt,
    payer_message,
    sign_member_receipt,
    sign_receipt,
)
from p2pgpu.core._receipt import (
    cosign as cosign_receipt,
)

VECTORS = Path(__file__).resolve().parent.parent / "data" / "vectors.json"
ADDRESS = "4wBqpZM9xaSheZzJSMawUKKwhdpChKbZ5eu5ky4Vigw"
#: The receipt's payer: a Solana keypair (the base58 of its Ed25519 public key
#: is its address), which co-signs the receipt (#16.2).
PAYER_SEED = bytes(range(96, 128))
SEEDS = {"alice": bytes(range(32)), "bob": bytes(range(32, 64)), "carol": bytes(range(64, 96))}
T0 = 1_700_000_000_000


def _j(x: Any) -> Any:
    """JSON form: bytes as {"hex": ...}, tuples as lists."""
    if isinstance(x, bytes):
        return {"hex": x.hex()}
    if isinstance(x, dict):
        return {k: _j(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_j(v) for v in x]
    return x


def _ids() -> dict[str, Identity]:
    return {name: Identity(seed) for name, seed in SEEDS.items()}


def _signed(kind: Kind, body_obj: dict[str, Any], wire: bytes, **hashes: bytes | str) -> dict[str, Any]:
    return {"kind": kind.value, "body_obj": _j(body_obj), "body": encode(body_obj).hex(), "wire": wire.hex(),
            **{k: v.hex() if isinstance(v, bytes) else v for k, v in hashes.items()}}


def build() -> dict[str, Any]:
    """Every vector, computed by the code as it is (what ``--write`` stores)."""
    ids = _ids()
    alice, bob, carol = ids["alice"], ids["bob"], ids["carol"]
    out: dict[str, Any] = {"about": __doc__.split("\n\n")[0]}
    out["identities"] = {n: {"seed": s.hex(), "public_key": ids[n].public_key.hex(), "peer_id": ids[n].peer_id}
                         for n, s in SEEDS.items()}
    out["domain_tags"] = {k.value: k.domain_tag.hex() for k in Kind}

    gpu = GpuInfo(model="NVIDIA H100 80GB HBM3", memory_mb=81_559, compute_capability="9.0",
                  driver_version="550.54.15", cuda_version="12.4", uuid_hash="ab" * 32, utilization_pct=3)
    advert = Advert(peer_id=alice.peer_id, network="vectors", addrs=("/ip4/127.0.0.1/tcp/4001",), seq=7,
                    issued_at_ms=T0, expires_at_ms=T0 + 600_000, gpus=(gpu,), gpus_free=1,
                    price_per_gpu_hour=2_500_000, currency="SOL",
                    payout_address="4wBqpZM9xaSheZzJSMawUKKwhdpChKbZ5eu5ky4Vigw", region="eu",
                    runtimes=("process", "ray"), simulated=False)
    sa = sign_advert(alice, advert)
    out["advert"] = _signed(Kind.ADVERT, advert.to_obj(), sa.wire, digest=sa.envelope.digest,
                            gpu_class=gpu.gpu_class, class_key=class_key(gpu.gpu_class),
                            advert_key=advert_key(alice.peer_id))

    manifest = Manifest(name="vectors", submitter=bob.peer_id, created_at_ms=T0, expires_at_ms=T0 + 600_000,
                        nonce=bytes(range(16)), nodes=2, gpus_per_node=1, memory_mb_min=40_960, models=("H100",),
                        compute_capability_min="8.0", regions=("eu",), allow_simulated=False, runtime="process",
                        command=("sh", "-c", "echo hello"), env=(("A", "1"),), network=False, duration_s_max=600,
                        inputs=(JobInput(name="in.txt", data=b"hello"),
                                JobInput(name="big.bin", sha256="cd" * 32, size_bytes=1 << 20)),
                        price_per_gpu_hour_max=3_000_000, currency="SOL",
                        payer="4wBqpZM9xaSheZzJSMawUKKwhdpChKbZ5eu5ky4Vigw", replicas=1, quorum=1,
                        on_member_loss="fail")
    sm = sign_manifest(bob, manifest)
    job_id = sm.job_id
    out["manifest"] = _signed(Kind.MANIFEST, manifest.to_obj(), sm.wire, job_id=job_id)

    proposal = Proposal.sign(alice, job_id=job_id, view=0, round=1, members=(alice.peer_id, carol.peer_id),
                             gpus_per_member=1)
    accepts = tuple(Accept.sign(i, proposal=proposal, lease_until_ms=T0 + 60_000, price_per_gpu_hour=p,
                                payout_address="4wBqpZM9xaSheZzJSMawUKKwhdpChKbZ5eu5ky4Vigw")
                    for i, p in ((alice, 2_000_000), (carol, 2_500_000)))
    cert = Certificate(proposal=proposal, accepts=accepts)
    body_p = decode(proposal.envelope.body)
    out["proposal"] = _signed(Kind.PROPOSAL, body_p, proposal.envelope.to_bytes(), digest=proposal.digest)
    out["accepts"] = [_signed(Kind.ACCEPT, decode(a.envelope.body), a.envelope.to_bytes()) for a in accepts]
    out["certificate"] = {"digest": cert.digest.hex(), "tag": b"p2pgpu/certificate-hash/v1\x00".hex()}

    files = [("out/result.txt", 12, hashlib.sha256(b"hello world\n").digest()), ("log.txt", 0, bytes(32))]
    stdout_sha = hashlib.sha256(b"done\n").digest()
    out["output_digest"] = {"files": _j(files), "stdout_sha256": stdout_sha.hex(),
                            "digest": output_digest(files, stdout_sha).hex()}
    chain = CheckpointChain(job_id, cert.digest, alice.peer_id)
    for t, info in ((T0 + 10_000, b"step 1"), (T0 + 20_000, b"")):
        chain.add(t, info)
    out["chain"] = {"job_id": job_id, "cert_hash": cert.digest.hex(), "peer_id": alice.peer_id,
                    "checkpoints": [[c.t_ms, c.info.hex()] for c in chain.checkpoints],
                    "heads": [h.hex() for h in chain.heads]}
    proof = Proof(job_id=job_id, cert_hash=cert.digest, peer_id=alice.peer_id, gpus=("gpu-0",),
                  started_at_ms=T0, ended_at_ms=T0 + 25_000, gpu_ms=25_000, exit_code=0, end_reason="exited",
                  output_digest=output_digest(files, stdout_sha), checkpoints=tuple(chain.checkpoints),
                  chain_head=chain.head)
    sp = sign_proof(alice, proof)
    out["proof"] = _signed(Kind.PROOF, proof.to_obj(), sp.wire, proof_hash=sp.proof_hash)
    cosign = Cosign(job_id=job_id, cert_hash=cert.digest, subject=alice.peer_id, observer=carol.peer_id,
                    first_seen_ms=T0 + 1_000, last_seen_ms=T0 + 24_000, heartbeats=24,
                    last_chain_head=chain.heads[1])
    sc = sign_cosign(carol, cosign)
    out["cosign"] = _signed(Kind.COSIGN, cosign.to_obj(), sc.wire, digest=sc.envelope.digest)

    tx_sig = "5" + "K" * 86  # 87 base58 characters, the shape of a transaction signature
    payer_key = Identity(PAYER_SEED)
    payer = base58.b58encode(payer_key.public_key).decode()
    rc = Receipt(job_id=job_id, cert_hash=cert.digest, submitter=bob.peer_id, payer=payer, currency="SOL",
                 settled_at_ms=T0 + 60_000, lines=tuple(sorted((
                     # paid in two transactions: an installment and the remainder (#16)
                     ReceiptLine(peer_id=alice.peer_id, outcome="paid", amount=13_888, address=ADDRESS,
                                 payments=((tx_sig, 10_000), ("4" + "J" * 86, 3_888)), proof_hash=sp.proof_hash),
                     ReceiptLine(peer_id=carol.peer_id, outcome="no_proof", amount=0, address="", payments=(),
                                 proof_hash=b"")), key=lambda ln: ln.peer_id)))
    rc = cosign_receipt(rc, payer_key.sign)
    sr = sign_receipt(bob, rc)
    out["receipt"] = _signed(Kind.RECEIPT, rc.to_obj(), sr.wire, digest=sr.digest, payer_seed=PAYER_SEED,
                             payer_message=payer_message(rc))
    mr = MemberReceipt(job_id=job_id, cert_hash=cert.digest, member=alice.peer_id, submitter=bob.peer_id,
                       owed=13_888, received=13_888, tx_signature=tx_sig, verdict="on_time",
                       reported_at_ms=T0 + 61_000)
    smr = sign_member_receipt(alice, mr)
    out["member_receipt"] = _signed(Kind.MEMBER_RECEIPT, mr.to_obj(), smr.wire, digest=smr.digest)

    seed = bytes(range(100, 132))
    ch = Challenge(challenger=bob.peer_id, prover=alice.peer_id, model="h100", n=8192, seed=seed, deadline_ms=2_516,
                   issued_at_ms=T0)
    sch = seal(bob, Kind.CHALLENGE, ch.to_obj())
    product = bytes(i % 251 for i in range(64))
    commit = commitment_of(sch.digest, product)
    ans = ChallengeAnswer(challenge=sch.digest, prover=alice.peer_id, status="ok", commitment=commit)
    out["challenge"] = _signed(Kind.CHALLENGE, ch.to_obj(), sch.to_bytes(), digest=sch.digest,
                               matrix_key_a=matrix_keys(seed)[0], matrix_key_b=matrix_keys(seed)[1],
                               product_mod_p=product, commitment=commit)
    out["challenge_answer"] = _signed(Kind.CHALLENGE_ANSWER, ans.to_obj(),
                                      seal(alice, Kind.CHALLENGE_ANSWER, ans.to_obj()).to_bytes())

    hashes = [bytes([i]) * 32 for i in range(1, 6)]
    ip = inclusion_proof(hashes, hashes[2])
    out["merkle"] = {"proof_hashes": [h.hex() for h in hashes],
                     "roots": [merkle_root(hashes[:n]).hex() for n in range(6)],
                     "inclusion": ip.to_json(), "memo": memo_of_root(merkle_root(hashes)),
                     "proof_hash_of_the_proof_above": {"leaf": sp.proof_hash.hex(),
                                                       "root": merkle_root([sp.proof_hash]).hex()}}
    return out


# --- the tests ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vectors() -> dict[str, Any]:
    return json.loads(VECTORS.read_text())  # type: ignore[no-any-return]


SECTIONS = ["identities", "domain_tags", "advert", "manifest", "proposal", "accepts", "certificate",
            "output_digest", "chain", "proof", "cosign", "merkle", "receipt", "member_receipt", "challenge",
            "challenge_answer"]


@pytest.mark.parametrize("section", SECTIONS)
def test_the_code_reproduces_every_vector(section: str, vectors: dict[str, Any]) -> None:
    # Built afresh in each test (not in a shared fixture): a mutation tool
    # that runs only the tests covering a function must find them all here.
    assert build()[section] == vectors[section], (
        f"the wire format of {section} changed; if that is intended, regenerate tests/data/vectors.json "
        "(python tests/core/test_vectors.py --write) and document it in docs/protocol.md")


def test_vectors_are_independent_of_the_code_that_wrote_them(vectors: dict[str, Any]) -> None:
    """Recompute what can be recomputed from the JSON alone with hashlib and
    msgpack's own rules, without the cores: the hash rules, not just their output."""
    sha = hashlib.sha256
    for kind, tag in vectors["domain_tags"].items():
        assert bytes.fromhex(tag) == f"p2pgpu/{kind}/v1\x00".encode()
    for name in ("advert", "manifest", "proof", "cosign", "receipt", "member_receipt", "challenge"):
        v = vectors[name]
        tag = bytes.fromhex(vectors["domain_tags"][v["kind"]])
        digest = sha(tag + bytes.fromhex(v["body"])).hexdigest()
        assert digest == v.get("digest", v.get("job_id", v.get("proof_hash")))
    # The output digest: the tag, then canonical msgpack of the sorted rows and the stdout hash.
    od = vectors["output_digest"]
    rows = sorted([p, n, bytes.fromhex(h["hex"])] for p, n, h in od["files"])
    assert sha(b"p2pgpu/outputs/v1\x00" + encode({"files": rows, "stdout_sha256": bytes.fromhex(
        od["stdout_sha256"])})).hexdigest() == od["digest"]
    # The checkpoint chain.
    ch = vectors["chain"]
    head = sha(b"p2pgpu/checkpoint/v1\x00" + encode({"job_id": ch["job_id"], "cert_hash": bytes.fromhex(
        ch["cert_hash"]), "peer_id": ch["peer_id"]})).digest()
    heads = [head]
    for t, info in ch["checkpoints"]:
        head = sha(b"p2pgpu/checkpoint/v1\x00" + head + encode({"t_ms": t, "info": bytes.fromhex(info)})).digest()
        heads.append(head)
    assert [h.hex() for h in heads] == ch["heads"]
    # RFC 6962 Merkle roots.
    leaves = [sha(b"\x00" + bytes.fromhex(h)).digest() for h in vectors["merkle"]["proof_hashes"]]

    def n(a: bytes, b: bytes) -> bytes:
        return sha(b"\x01" + a + b).digest()

    roots = [sha(b"").digest(), leaves[0], n(leaves[0], leaves[1]), n(n(leaves[0], leaves[1]), leaves[2]),
             n(n(leaves[0], leaves[1]), n(leaves[2], leaves[3])),
             n(n(n(leaves[0], leaves[1]), n(leaves[2], leaves[3])), leaves[4])]
    assert [r.hex() for r in roots] == vectors["merkle"]["roots"]
    # The certificate digest: its tag and the canonical map of the envelopes.

    def env(v: dict[str, Any]) -> dict[str, Any]:
        signed = decode(bytes.fromhex(v["wire"]))
        return {"k": v["kind"], "v": 1, "b": bytes.fromhex(v["body"]), "s": signed["s"], "g": signed["g"]}

    cert_obj = {"proposal": env(vectors["proposal"]), "accepts": [env(a) for a in vectors["accepts"]]}
    assert sha(b"p2pgpu/certificate-hash/v1\x00" + encode(cert_obj)).hexdigest() == vectors["certificate"]["digest"]
    # The challenge's matrix keys and the commitment to the product.
    chv = vectors["challenge"]
    seed = bytes.fromhex(chv["body_obj"]["seed"]["hex"])
    assert sha(b"p2pgpu/challenge-matrix/v1\x00" + seed + b"A").hexdigest() == chv["matrix_key_a"]
    assert sha(b"p2pgpu/challenge-matrix/v1\x00" + seed + b"B").hexdigest() == chv["matrix_key_b"]
    assert sha(b"p2pgpu/challenge-commit/v1\x00" + bytes.fromhex(chv["digest"]) + bytes.fromhex(
        chv["product_mod_p"])).hexdigest() == chv["commitment"]
    # The payer's co-signature of the receipt (#16.2): Ed25519 by the key whose
    # base58 is the payer's address, over its tag and the body without that field.
    rv = vectors["receipt"]
    body = decode(bytes.fromhex(rv["body"]))
    cosig = body.pop("payer_signature")
    message = b"p2pgpu/receipt-payer/v1\x00" + encode(body)
    assert message.hex() == rv["payer_message"]
    nacl.signing.VerifyKey(base58.b58decode(body["payer"])).verify(message, cosig)
    # DHT keys.
    adv = vectors["advert"]
    assert adv["class_key"] == "1220" + sha(f"/p2pgpu/class/{adv['gpu_class']}".encode()).hexdigest()
    peer = vectors["identities"]["alice"]["peer_id"]
    assert adv["advert_key"] == "/p2pgpu/a/" + sha(peer.encode()).hexdigest()[:32]


def test_every_signed_vector_verifies_and_decodes_to_its_fields(vectors: dict[str, Any]) -> None:
    wire = {k: bytes.fromhex(vectors[k]["wire"]) for k in ("advert", "manifest", "proof", "cosign")}
    sa = verify_advert(wire["advert"], now_ms=T0 + 1)
    assert _j(sa.advert.to_obj()) == vectors["advert"]["body_obj"]
    sm = verify_manifest(wire["manifest"], now_ms=T0 + 1)
    assert _j(sm.manifest.to_obj()) == vectors["manifest"]["body_obj"] and sm.job_id == vectors["manifest"]["job_id"]
    sp = decode_proof(wire["proof"])
    assert _j(sp.proof.to_obj()) == vectors["proof"]["body_obj"]
    assert sp.proof_hash.hex() == vectors["proof"]["proof_hash"]
    sc = decode_cosign(wire["cosign"])
    assert _j(sc.cosign.to_obj()) == vectors["cosign"]["body_obj"]
    assert _j(decode_receipt(bytes.fromhex(vectors["receipt"]["wire"])).receipt.to_obj()) == \
        vectors["receipt"]["body_obj"]
    assert _j(decode_member_receipt(bytes.fromhex(vectors["member_receipt"]["wire"])).receipt.to_obj()) == \
        vectors["member_receipt"]["body_obj"]
    assert _j(decode_challenge(bytes.fromhex(vectors["challenge"]["wire"])).challenge.to_obj()) == \
        vectors["challenge"]["body_obj"]
    assert _j(decode_answer(bytes.fromhex(vectors["challenge_answer"]["wire"])).answer.to_obj()) == \
        vectors["challenge_answer"]["body_obj"]
    for v in [vectors["proposal"], *vectors["accepts"]]:
        env, body = open_envelope(bytes.fromhex(v["wire"]))
        assert env.kind.value == v["kind"] and _j(body) == v["body_obj"]
    for ident in vectors["identities"].values():
        i = Identity(bytes.fromhex(ident["seed"]))
        assert (i.public_key.hex(), i.peer_id) == (ident["public_key"], ident["peer_id"])
    chain = vectors["chain"]
    assert chain_genesis(chain["job_id"], bytes.fromhex(chain["cert_hash"]), chain["peer_id"]).hex() == \
        chain["heads"][0]
    from p2pgpu.core._payout import InclusionProof

    ip = InclusionProof.from_json(vectors["merkle"]["inclusion"])
    assert verify_inclusion(ip) and ip.root.hex() == vectors["merkle"]["roots"][5]


def test_a_signature_is_over_the_tag_and_the_body(vectors: dict[str, Any]) -> None:
    ids = _ids()
    for name, signer in (("advert", "alice"), ("manifest", "bob"), ("proof", "alice"), ("cosign", "carol"),
                         ("receipt", "bob"), ("member_receipt", "alice"), ("challenge", "bob"),
                         ("challenge_answer", "alice")):
        v = vectors[name]
        obj = decode(bytes.fromhex(v["wire"]))
        assert obj == {"k": v["kind"], "v": 1, "b": bytes.fromhex(v["body"]), "s": ids[signer].public_key,
                       "g": obj["g"]}
        assert obj["g"] == ids[signer].sign(bytes.fromhex(vectors["domain_tags"][v["kind"]]) + obj["b"])
        assert seal(ids[signer], Kind(v["kind"]), decode(obj["b"])).to_bytes().hex() == v["wire"]


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit("usage: python tests/core/test_vectors.py --write   (regenerates tests/data/vectors.json)")
    VECTORS.write_text(json.dumps(build(), indent=1, sort_keys=True) + "\n")
    print(f"wrote {VECTORS}")
