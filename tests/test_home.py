"""A node home: identity kept private and stable, config validated, libp2p-compatible.

Real files in a temporary directory.  The identity file must be exactly the
one py-libp2p writes and reads (``libp2p.identity_utils``), so the host and our
envelopes sign with one key and the peer id survives restarts.
"""

from __future__ import annotations

import stat
import warnings
from pathlib import Path

import pytest

from p2pgpu.core import Identity
from p2pgpu.home import Config, Home, HomeError, load_networks, resolve_home

with warnings.catch_warnings():
    # py-libp2p imports websockets.legacy, which warns on import (not our code).
    warnings.simplefilter("ignore", DeprecationWarning)
    from libp2p.crypto.ed25519 import create_new_key_pair
    from libp2p.identity_utils import load_identity, save_identity
    from libp2p.peer.id import ID

PAYOUT = "So11111111111111111111111111111111111111112"


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_init_creates_private_identity_config_and_token(tmp_path: Path) -> None:
    home = Home(tmp_path / "node")
    ident = home.init(payout_address=PAYOUT)
    assert _mode(home.path) == 0o700
    assert _mode(home.identity_path) == 0o600
    assert _mode(home.token_path) == 0o600
    assert home.exists()
    cfg = home.config()
    assert cfg.network == "local" and cfg.payout_address == PAYOUT
    assert home.identity().peer_id == ident.peer_id
    token = home.token()
    assert len(token) == 64 and int(token, 16) >= 0
    assert home.token() == token


def test_init_refuses_to_overwrite(tmp_path: Path) -> None:
    home = Home(tmp_path)
    first = home.init()
    key = home.identity_path.read_bytes()
    with pytest.raises(HomeError, match="refusing to overwrite"):
        home.init()
    with pytest.raises(HomeError):
        home.init(seed=b"\x01" * 32)
    assert home.identity_path.read_bytes() == key
    assert Home(tmp_path).identity().peer_id == first.peer_id


def test_peer_id_is_stable_across_reloads(tmp_path: Path) -> None:
    pid = Home(tmp_path).init().peer_id
    for _ in range(3):
        assert Home(tmp_path).identity().peer_id == pid


def test_seeded_init_is_deterministic(tmp_path: Path) -> None:
    seed = bytes(range(32))
    a = Home(tmp_path / "a").init(seed=seed)
    b = Home(tmp_path / "b").init(seed=seed)
    assert a.peer_id == b.peer_id == Identity(seed).peer_id


@pytest.mark.parametrize("bad", ["not-base58-0OIl", "1111", "abc", PAYOUT + "1", "é"])
def test_bad_payout_address_is_rejected(tmp_path: Path, bad: str) -> None:
    home = Home(tmp_path / "h")
    with pytest.raises(HomeError, match="not a Solana address"):
        home.init(payout_address=bad)
    assert not home.path.exists()  # nothing half-written


def test_bad_payout_address_in_config_is_rejected(tmp_path: Path) -> None:
    home = Home(tmp_path)
    home.init()
    home.config_path.write_text(home.config_path.read_text().replace('payout_address = ""',
                                                                     'payout_address = "nope"'))
    with pytest.raises(HomeError, match="not a Solana address"):
        home.config()


def test_unknown_network_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(HomeError, match="unknown network"):
        Home(tmp_path / "h").init(network="moonnet")


def test_key_file_is_libp2p_format(tmp_path: Path) -> None:
    home = Home(tmp_path)
    ident = home.init()
    kp = load_identity(home.identity_path)
    assert ID.from_pubkey(kp.public_key).to_base58() == ident.peer_id


def test_key_saved_by_libp2p_is_read(tmp_path: Path) -> None:
    home = Home(tmp_path)
    home.init()
    home.identity_path.unlink()
    kp = create_new_key_pair(b"\x05" * 32)
    save_identity(kp, home.identity_path)
    assert home.identity().peer_id == ID.from_pubkey(kp.public_key).to_base58()


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o666, 0o700 | 0o004])
def test_bad_key_file_mode_is_rejected(tmp_path: Path, mode: int) -> None:
    home = Home(tmp_path)
    home.init()
    home.identity_path.chmod(mode)
    with pytest.raises(HomeError, match="chmod 600"):
        home.identity()


def test_owner_only_modes_are_accepted(tmp_path: Path) -> None:
    home = Home(tmp_path)
    pid = home.init().peer_id
    home.identity_path.chmod(0o400)
    assert home.identity().peer_id == pid


@pytest.mark.parametrize("content", [b"", b"\x08\x01\x12\x20" + b"\x00" * 31,
                                     b"\x08\x00\x12\x20" + b"\x00" * 32,
                                     b"garbage" * 10, b"\x08\x01\x12\x40" + b"\x00" * 64])
def test_corrupt_key_file_is_rejected(tmp_path: Path, content: bytes) -> None:
    home = Home(tmp_path)
    home.init()
    home.identity_path.write_bytes(content)
    with pytest.raises(HomeError, match="not an Ed25519 libp2p key"):
        home.identity()


def test_missing_home_says_what_to_do(tmp_path: Path) -> None:
    home = Home(tmp_path / "none")
    with pytest.raises(HomeError, match="p2pgpu init"):
        home.identity()
    with pytest.raises(HomeError, match="p2pgpu init"):
        home.config()


def test_init_keeps_a_token_left_from_before(tmp_path: Path) -> None:
    home = Home(tmp_path)
    home.init()
    token = home.token()
    home.identity_path.unlink()  # the operator removed the key to get a new identity
    home.init()
    assert home.token() == token


def test_missing_token_is_recreated(tmp_path: Path) -> None:
    home = Home(tmp_path)
    home.init()
    home.token_path.unlink()
    token = home.token()
    assert len(token) == 64 and _mode(home.token_path) == 0o600


def test_config_round_trip_and_extra_keys() -> None:
    cfg = Config(network="devnet", payout_address=PAYOUT, region="eu-west", price_per_gpu_hour=5,
                 listen=["/ip4/0.0.0.0/tcp/4001", "/ip4/127.0.0.1/tcp/4002"], allow_job_network=True)
    again = Config.from_toml(cfg.to_toml())
    assert again == cfg
    extra = Config.from_toml(cfg.to_toml() + "future_option = 3\n")
    assert extra.extra == {"future_option": 3}


@pytest.mark.parametrize("line", ['price_per_gpu_hour = "5"', 'listen = "/ip4/127.0.0.1/tcp/0"',
                                  "listen = [1]",
                                  "allow_job_network = 1", "control_port = true", "advert_ttl_s = 60.0",
                                  "network = 3"])
def test_config_wrong_types_are_rejected(line: str) -> None:
    with pytest.raises(HomeError, match="must be of type"):
        Config.from_toml(line + "\n")


def test_config_bad_toml() -> None:
    with pytest.raises(HomeError, match="not valid TOML"):
        Config.from_toml("network = ")


def test_resolve_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("P2PGPU_HOME", str(tmp_path / "env"))
    assert resolve_home(tmp_path / "arg") == tmp_path / "arg"
    assert resolve_home(None) == tmp_path / "env"
    monkeypatch.delenv("P2PGPU_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve_home(None) == tmp_path / ".p2pgpu"
    assert resolve_home("~/x") == tmp_path / "x"


def test_networks(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("P2PGPU_NETWORKS", raising=False)
    nets = load_networks()
    assert {"local", "devnet", "mainnet"} <= set(nets)
    assert nets["local"].allow_simulated and not nets["mainnet"].allow_simulated
    custom = tmp_path / "nets.toml"
    custom.write_text('[networks.lab]\nbootstrap = ["/ip4/127.0.0.1/tcp/1/p2p/x"]\n')
    monkeypatch.setenv("P2PGPU_NETWORKS", str(custom))
    nets = load_networks()
    assert set(nets) == {"lab", "local"}  # local always exists
    assert nets["lab"].bootstrap == ("/ip4/127.0.0.1/tcp/1/p2p/x",) and not nets["lab"].allow_simulated
    custom.write_text("[networks\n")
    with pytest.raises(HomeError, match="not valid TOML"):
        load_networks()
