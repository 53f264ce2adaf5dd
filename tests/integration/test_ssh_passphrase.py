"""An encrypted SSH key on the SSH namespace hosts: its passphrase comes from the environment
variable the scenario names (``identity_passphrase_env``) and is never shown or written.

The testbed's sshd reads its AuthorizedKeysFile on every login, so the test key's public
half is appended there for the module and removed afterwards.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from migrator.cache import CACHE_DIR
from migrator.config import dump_scenario
from tests.integration.children import migrator
from tests.integration.conftest import scenario
from tests.integration.ssh_scenarios import host_entry
from tests.integration.sshhosts import SSHTestbed

ENV = "MIGRATOR_IT_KEY_PASSPHRASE"
PASSPHRASE = "it-Passphrase 7f3a9c never-shown"
WRONG = "it-wrong 41d2e8 also-never-shown"


@pytest.fixture(scope="module")
def encrypted_key(ssh_testbed: SSHTestbed,
                  tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """An ed25519 key encrypted with PASSPHRASE, authorized on both testbed hosts."""
    key = tmp_path_factory.mktemp("encrypted-key") / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", PASSPHRASE, "-C",
                    "migrator-it-passphrase", "-f", str(key)], check=True, capture_output=True)
    # Really encrypted: without the passphrase ssh-keygen cannot read it.
    assert subprocess.run(["ssh-keygen", "-y", "-P", "", "-f", str(key)], capture_output=True,
                          check=False).returncode != 0
    public = key.with_suffix(".pub").read_text().strip()
    authorized = ssh_testbed.workdir / "authorized_keys"
    with authorized.open("a") as keys:
        keys.write(public + "\n")
    try:
        yield key
    finally:
        kept = [line for line in authorized.read_text().splitlines() if line != public]
        authorized.write_text("".join(f"{line}\n" for line in kept))


def write_scenario(tmp_path: Path, bed: SSHTestbed, work_root: Path, key: Path,
                   **sections: dict[str, object]) -> Path:
    """Both hosts reached with the encrypted key (ENV must be set while it is built)."""
    entry = {"identity_file": str(key), "identity_passphrase_env": ENV}
    hosts: dict[str, object] = {
        "source": host_entry(bed, bed.a, work_root, **entry),
        "destination": host_entry(bed, bed.b, work_root, migration_address=bed.b.peer_address,
                                  **entry),
    }
    spec = tmp_path / "s.toml"
    spec.write_text(dump_scenario(scenario("it-ssh-passphrase", hosts=hosts, **sections)))
    return spec


def written_since(started: float, *roots: Path) -> list[Path]:
    """Every file under ``roots`` modified since ``started``."""
    return [path for root in roots if root.exists() for path in root.rglob("*")
            if path.is_file() and path.stat().st_mtime >= started - 1]


def assert_never_shown(secrets: tuple[str, ...], done: subprocess.CompletedProcess[str],
                       files: list[Path]) -> None:
    for secret in secrets:
        assert secret not in done.stdout
        assert secret not in done.stderr
        for path in files:
            assert secret.encode() not in path.read_bytes(), path


def test_hosts_check_with_the_passphrase_from_the_environment(
    tmp_path: Path, ssh_testbed: SSHTestbed, work_root: Path, encrypted_key: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    started = time.time()
    monkeypatch.setenv(ENV, PASSPHRASE)
    spec = write_scenario(tmp_path, ssh_testbed, work_root, encrypted_key)
    assert ENV in spec.read_text()
    done = migrator("hosts", "check", str(spec), "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert [host["host"] for host in report["hosts"]] == [ssh_testbed.a.address,
                                                          ssh_testbed.b.address]
    assert all(host["kernel"] for host in report["hosts"])
    files = written_since(started, tmp_path, work_root, CACHE_DIR)
    assert spec in files
    assert_never_shown((PASSPHRASE,), done, files)


def test_wrong_passphrase_is_one_clear_line(
    tmp_path: Path, ssh_testbed: SSHTestbed, work_root: Path, encrypted_key: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    started = time.time()
    monkeypatch.setenv(ENV, WRONG)
    spec = write_scenario(tmp_path, ssh_testbed, work_root, encrypted_key)
    done = migrator("hosts", "check", str(spec), "--json")
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stdout == ""
    [line] = [line for line in done.stderr.splitlines() if line.strip()]
    # Named by the source's address: the first host connected to.
    assert line == (f"error: {ssh_testbed.a.address}: identity file {encrypted_key}: the "
                    f"passphrase in environment variable {ENV} (identity_passphrase_env) does "
                    f"not decrypt it; set {ENV} to this key's passphrase")
    assert_never_shown((WRONG, PASSPHRASE), done,
                       written_since(started, tmp_path, work_root, CACHE_DIR))


def test_verbose_run_logs_no_passphrase(
    tmp_path: Path, ssh_testbed: SSHTestbed, work_root: Path, encrypted_key: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Connected with the key, logged at INFO (-v), then refused by the preflight (no such
    # QEMU on either host), so no VM ever boots and no hugepage is taken.
    started = time.time()
    monkeypatch.setenv(ENV, PASSPHRASE)
    spec = write_scenario(tmp_path, ssh_testbed, work_root, encrypted_key,
                          vm={"qemu": "/nonexistent/qemu-system-x86_64"})
    runs = tmp_path / "runs"
    done = migrator("run", str(spec), "--runs-dir", str(runs), "-v")
    assert done.returncode == 3, done.stderr
    assert "Traceback" not in done.stderr
    assert f"{ssh_testbed.a.address}: connected to root@{ssh_testbed.a.address}:22" \
        in done.stderr
    [run_dir] = runs.iterdir()
    assert (run_dir / "run.json").is_file()
    assert ENV in (run_dir / "scenario.toml").read_text()
    files = written_since(started, tmp_path, work_root, CACHE_DIR)
    assert run_dir / "run.json" in files
    assert_never_shown((PASSPHRASE,), done, files)
