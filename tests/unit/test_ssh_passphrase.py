"""The passphrase of an encrypted SSH key: named in the scenario, read from the environment,
handed to asyncssh, and never shown (repr, dicts, errors, logs)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import socket
from pathlib import Path

import asyncssh
import pytest
from pydantic import SecretStr

from migrator.config import dump_scenario, parse_scenario
from migrator.config.models import SSHHostSpec
from migrator.errors import ConfigError, HostError, MigratorError
from migrator.hosts.ssh import SSHHost, SSHTarget
from migrator.runner import ssh_target

PASSPHRASE = "correct horse battery staple"
ENV = "MIGRATOR_TEST_KEY_PASSPHRASE"


def ssh(**fields: object) -> dict[str, object]:
    return {"kind": "ssh", "address": "192.0.2.10", "identity_file": "/keys/id_ed25519",
            **fields}


def load(source: dict[str, object]) -> SSHHostSpec:
    scenario = parse_scenario({"name": "x", "hosts": {"source": source,
                                                       "destination": ssh(address="h2")}},
                              source="s.toml")
    assert isinstance(scenario.hosts.source, SSHHostSpec)
    return scenario.hosts.source


def refusal(source: dict[str, object]) -> str:
    with pytest.raises(ConfigError) as caught:
        load(source)
    text = str(caught.value)
    assert "\n" not in text
    assert caught.value.exit_code == 2
    return text


# --- the scenario ------------------------------------------------------------------------------


def test_the_entry_holds_the_name_never_the_passphrase(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV, PASSPHRASE)
    spec = load(ssh(identity_passphrase_env=ENV))
    assert spec.identity_passphrase_env == ENV
    assert PASSPHRASE not in repr(spec)
    resolved = dump_scenario(parse_scenario({"name": "x", "hosts": {
        "source": ssh(identity_passphrase_env=ENV), "destination": ssh(address="h2")}}))
    assert f'identity_passphrase_env = "{ENV}"' in resolved
    assert PASSPHRASE not in resolved
    # Unset by default: an unencrypted key.
    assert load(ssh()).identity_passphrase_env is None


def test_unset_variable_is_refused_naming_the_field(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV, raising=False)
    text = refusal(ssh(identity_passphrase_env=ENV))
    assert text.startswith("s.toml: hosts.source.ssh.identity_passphrase_env: the environment "
                           "variable it names is not set (or empty); export it")
    monkeypatch.setenv(ENV, "")
    assert "is not set (or empty)" in refusal(ssh(identity_passphrase_env=ENV))


@pytest.mark.parametrize("value", [PASSPHRASE, "1PASS", "MY-PASS", "", "$HOME", "a=b"])
def test_not_a_variable_name_is_refused_without_echoing_it(value: str) -> None:
    text = refusal(ssh(identity_passphrase_env=value))
    assert text.startswith("s.toml: hosts.source.ssh.identity_passphrase_env: not an environment "
                           "variable name")
    assert "never the passphrase itself" in text
    assert "got" not in text
    if value:
        assert value not in text.split("identity_passphrase_env: ", 1)[1]


def test_other_type_errors_do_not_echo_either() -> None:
    text = refusal(ssh(identity_passphrase_env=20240601))
    assert "identity_passphrase_env: Input should be a valid string" in text
    assert "20240601" not in text


def test_passphrase_needs_identity_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV, PASSPHRASE)
    entry = ssh(identity_passphrase_env=ENV)
    del entry["identity_file"]
    assert "identity_passphrase_env: needs identity_file" in refusal(entry)


# --- the SSH target ----------------------------------------------------------------------------


def test_ssh_target_reads_the_variable_and_hides_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV, PASSPHRASE)
    target = ssh_target(load(ssh(identity_passphrase_env=ENV)))
    assert target.passphrase is not None
    assert target.passphrase.get_secret_value() == PASSPHRASE
    assert target.passphrase_env == ENV
    for shown in (repr(target), str(target), str(dataclasses.asdict(target)),
                  json.dumps(dataclasses.asdict(target), default=str)):
        assert PASSPHRASE not in shown
    assert "passphrase=" not in repr(target)
    # The passphrase is not part of a target's identity (equality, hashing).
    assert target == dataclasses.replace(target, passphrase=SecretStr("other"))
    with pytest.raises(TypeError):
        json.dumps({"passphrase": target.passphrase})
    # Without the option, no passphrase.
    assert ssh_target(load(ssh())).passphrase is None


def test_ssh_target_refuses_a_variable_gone_since_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV, PASSPHRASE)
    spec = load(ssh(identity_passphrase_env=ENV))
    monkeypatch.delenv(ENV)
    with pytest.raises(ConfigError) as caught:
        ssh_target(spec)
    assert str(caught.value).startswith(
        "identity_passphrase_env of the hosts entry for 192.0.2.10: the environment variable "
        "it names is no longer set")


# --- connecting: asyncssh loads the key before it opens any socket ----------------------------


@pytest.fixture
def encrypted_key(tmp_path: Path) -> Path:
    key = tmp_path / "id_ed25519"
    key.write_bytes(asyncssh.generate_private_key("ssh-ed25519").export_private_key(
        "openssh", passphrase=PASSPHRASE))
    (tmp_path / "known_hosts").write_text("")
    return key


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def connect(key: Path, passphrase: str | None, port: int = 22) -> MigratorError:
    target = SSHTarget("127.0.0.1", port=port, identity_file=key,
                       known_hosts=key.parent / "known_hosts",
                       passphrase=SecretStr(passphrase) if passphrase is not None else None,
                       passphrase_env=ENV if passphrase is not None else None,
                       connect_timeout=5.0)

    async def attempt() -> None:
        async with SSHHost(target):
            pass

    with pytest.raises(MigratorError) as caught:
        asyncio.run(attempt())
    assert "\n" not in str(caught.value)
    return caught.value


def test_wrong_passphrase_is_one_line_naming_the_key_and_variable(
    encrypted_key: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    wrong = "not the passphrase at all"
    error = connect(encrypted_key, wrong)
    assert isinstance(error, ConfigError)
    assert str(error) == (f"127.0.0.1: identity file {encrypted_key}: the passphrase in "
                          f"environment variable {ENV} (identity_passphrase_env) does not "
                          f"decrypt it; set {ENV} to this key's passphrase")
    assert wrong not in caplog.text
    assert PASSPHRASE not in caplog.text


def test_encrypted_key_without_passphrase_says_what_to_set(encrypted_key: Path) -> None:
    error = connect(encrypted_key, None)
    assert isinstance(error, ConfigError)
    assert str(error) == (f"127.0.0.1: identity file {encrypted_key} is encrypted: set "
                          "identity_passphrase_env in its hosts entry to the name of an "
                          "environment variable that holds its passphrase")


def test_right_passphrase_gets_as_far_as_the_network(
    encrypted_key: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    port = closed_port()
    error = connect(encrypted_key, PASSPHRASE, port=port)
    # The key was decrypted: what failed is the TCP connection.
    assert isinstance(error, HostError)
    assert str(error) == f"127.0.0.1: cannot connect to 127.0.0.1:{port}: Connection refused"
    assert PASSPHRASE not in caplog.text
