#!/usr/bin/env python3
"""Build, test and convert the project's container images; the Makefile's ``image*`` targets.

    python3 docker/images.py build cpu|gpu [--engine podman|docker] [--base IMAGE]
    python3 docker/images.py test cpu        # pat_smoke trains and evaluates, the fast tests pass, in the image
    python3 docker/images.py check gpu       # torch (built for the CUDA the image declares), faiss-gpu, DeepSpeed
    python3 docker/images.py sif             # the CPU image as an Apptainer SIF (from its OCI archive)
    python3 docker/images.py apptainer-run   # launch/slurm.py --apptainer SIF: final weights = the run without it
    python3 docker/images.py clean [--all]

With podman (the default) nothing comes from a container registry: the Debian packages it needs are
installed with apt, the base image is bootstrapped with debootstrap (bookworm, python3.11 from
Debian) and imported, and builds run with ``--pull=never``. podman reads a containers.conf written
under ``.cache/containers`` (``CONTAINERS_CONF``), never the machine's own. pip inside a build reaches
the package index this machine's pip uses, through build secrets (never a layer). docs/containers.md
says why each setting is there.

Standard library only: it runs before any virtual environment exists. Every command is an argument
list; nothing a user types goes through a shell.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STATE = ROOT / ".cache" / "containers"
"""Project-local state: containers.conf, the pip secrets, OCI archive, SIF, test runs (git-ignored)."""
MIRROR = os.environ.get("DEBIAN_MIRROR", "http://deb.debian.org/debian")
BASE = "localhost/reid-base:bookworm"
"""The base image podman builds from: Debian bookworm (minbase) + its python3.11."""
NODE = "localhost/reid-apptainer:sid"
"""A stand-in cluster node with Apptainer (Debian has it in sid only), for ``sif`` and ``apptainer-run``."""
NODE_UID = 1000
"""The node's unprivileged user: Apptainer runs in a user namespace, as on a cluster without setuid."""
IMAGES = {"cpu": ("docker/Dockerfile.cpu", "reid-trainer:cpu"), "gpu": ("docker/Dockerfile", "reid-trainer:gpu")}
TOOLS = ("podman", "runc", "debootstrap")
"""Debian packages a podman build needs (runc: Debian's podman also accepts crun, which refuses this
machine's hybrid cgroup layout)."""
BASE_PACKAGES = ("python3", "python3-venv", "ca-certificates")
NODE_PACKAGES = ("apptainer", "squashfuse", "fuse3", "squashfs-tools", "ca-certificates",
                 # what a python built outside Debian (pyenv, conda) links to: the launcher's venv runs on the node
                 "libssl3t64", "libffi8", "libbz2-1.0", "liblzma5", "zlib1g", "libsqlite3-0", "libuuid1",
                 "libreadline8t64", "libncursesw6", "libexpat1")
FAST_TESTS = "not slow and not slurm"
TORCH_CUDA = "13.0"
"""The CUDA version docker/Dockerfile declares (ARG TORCH_CUDA); ``check gpu`` holds the image to it."""


def log(message: str) -> None:
    print(f"[images] {message}", flush=True)


def fail(message: str) -> None:
    print(f"docker/images.py: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def run(cmd: Sequence[str | os.PathLike[str]], *, env: dict[str, str] | None = None, cwd: Path | None = None,
        capture: bool = False) -> str:
    """Run ``cmd`` (an argument list), echoing it; a failure ends this script with the command's status."""
    words = [str(c) for c in cmd]
    log("$ " + " ".join(words))
    proc = subprocess.run(words, env=env, cwd=cwd, text=True, stdout=subprocess.PIPE if capture else None)
    if proc.returncode != 0:
        print(f"docker/images.py: error: exit {proc.returncode}: {' '.join(words)}", file=sys.stderr)
        raise SystemExit(proc.returncode)
    return proc.stdout if capture else ""


def timed(label: str, seconds: float) -> None:
    log(f"{label}: {seconds:.0f} s")


# -- podman's set-up --------------------------------------------------------------------------------

def podman_env() -> dict[str, str]:
    """The environment of every podman call: CONTAINERS_CONF names the project's containers.conf."""
    STATE.mkdir(parents=True, exist_ok=True)
    conf = STATE / "containers.conf"
    nofile = min(_hard_limit(resource.RLIMIT_NOFILE), 65536)
    nproc = min(_hard_limit(resource.RLIMIT_NPROC), 32768)  # podman runs itself under nproc 32768
    conf.write_text(f"""# written by docker/images.py (docs/containers.md): podman as root on a VM or in a container
[containers]
# podman's defaults (nofile=1048576) exceed this machine's hard limits: the runtime's setrlimit would fail
default_ulimits = ["nofile={nofile}:{nofile}", "nproc={nproc}:{nproc}"]
# no CNI bridge needed: builds and containers share the host's network (tests run with --network=none)
netns = "host"

[engine]
runtime = "runc"
# no systemd here
cgroup_manager = "cgroupfs"
events_logger = "file"
""")
    return {**os.environ, "CONTAINERS_CONF": str(conf)}


def _hard_limit(which: int) -> int:
    hard = resource.getrlimit(which)[1]
    return 1048576 if hard == resource.RLIM_INFINITY else hard


def ensure_tools(packages: Sequence[str] = TOOLS) -> None:
    """Install the Debian packages that are missing (apt; root)."""
    missing = [p for p in packages if not _installed(p)]
    if not missing:
        return
    if os.geteuid() != 0:
        fail(f"needs the Debian packages {' '.join(missing)}: install them (sudo apt-get install "
             f"{' '.join(missing)}) or run as root")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    run(["apt-get", "update", "-q"], env=env)
    run(["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing], env=env)


def _installed(package: str) -> bool:
    proc = subprocess.run(["dpkg-query", "-W", "-f=${Status}", package], capture_output=True, text=True)
    return proc.returncode == 0 and proc.stdout.endswith(" installed")


def image_exists(tag: str, engine: str = "podman") -> bool:
    env = podman_env() if engine == "podman" else None
    return subprocess.run([engine, "image", "exists" if engine == "podman" else "inspect", tag], env=env,
                          capture_output=True).returncode == 0


def bootstrap(tag: str, suite: str, packages: Sequence[str], user_uid: int | None = None) -> None:
    """``debootstrap --variant=minbase SUITE`` with ``packages``, imported into podman as ``tag``
    (kept: a later call reuses it)."""
    if image_exists(tag):
        log(f"{tag}: present")
        return
    ensure_tools()
    start = time.monotonic()
    with tempfile.TemporaryDirectory(dir=STATE, prefix="rootfs-") as tmp:
        rootfs = Path(tmp) / "rootfs"
        run(["debootstrap", "--variant=minbase", f"--include={','.join(packages)}", suite, rootfs, MIRROR])
        for cache in (rootfs / "var/lib/apt/lists", rootfs / "var/cache/apt/archives"):
            for item in cache.glob("*"):
                if item.is_file():
                    item.unlink()
        if user_uid is not None:
            run(["chroot", rootfs, "useradd", "--create-home", "--uid", str(user_uid), "--shell", "/bin/bash",
                 "reid"])
            (rootfs / "root").chmod(0o755)  # the node's user reaches a python installed under /root (pyenv)
        archive = Path(tmp) / "rootfs.tar"
        run(["tar", "--numeric-owner", "-C", rootfs, "-cf", archive, "."])
        run(["podman", "import", "--change", "ENV=PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
             "--change", "ENV=LANG=C.UTF-8", "--change", "CMD=/bin/bash", archive, tag], env=podman_env())
    timed(f"{tag} bootstrapped", time.monotonic() - start)


# -- pip's index and certificates, as build secrets ------------------------------------------------------

def pip_secrets() -> list[str]:
    """``--secret`` flags: ``pip_ca`` (the CA bundle this machine's pip trusts) and ``pip_conf`` (its
    http(s) index URLs and timeout; local ``file://`` indexes and find-links mean nothing in a build).
    Both are files under .cache/containers, mode 600; the Dockerfiles mount them for one RUN only."""
    settings = _pip_config()
    env_order = ("PIP_CERT", "REQUESTS_CA_BUNDLE", "SSL_CERT_FILE")
    candidates = [settings.get("cert")] + [os.environ.get(v) for v in env_order]
    ca = next((Path(c) for c in candidates if c and Path(c).is_file()), None)
    lines = ["[global]"]
    for key in ("index-url", "extra-index-url"):
        urls = [u for u in settings.get(key, "").split() if u.startswith(("http://", "https://"))]
        if urls:
            lines.append(f"{key} = {' '.join(urls)}")
    if "timeout" in settings:
        lines.append(f"timeout = {settings['timeout']}")
    STATE.mkdir(parents=True, exist_ok=True)
    conf, ca_copy = STATE / "pip.conf", STATE / "pip-ca.pem"
    for path, text in ((conf, "\n".join(lines) + "\n"), (ca_copy, ca.read_text() if ca else "")):
        path.touch(mode=0o600)
        path.chmod(0o600)
        path.write_text(text)
    log(f"pip in the build: CA bundle {ca or '(pip default)'}; {'; '.join(lines[1:]) or 'index PyPI'}")
    return ["--secret", f"id=pip_ca,src={ca_copy}", "--secret", f"id=pip_conf,src={conf}"]


def _pip_config() -> dict[str, str]:
    """This machine's pip settings (files and PIP_* variables), as ``pip config list`` reports them."""
    proc = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True)
    settings: dict[str, str] = {}
    for line in proc.stdout.splitlines() if proc.returncode == 0 else []:
        key, _, value = line.partition("=")
        name = key.rsplit(".", 1)[-1]
        settings[{"default-timeout": "timeout"}.get(name, name)] = value.strip().strip("'\"")
    return settings


# -- the images --------------------------------------------------------------------------------------

def build(variant: str, engine: str, base: str | None) -> str:
    """Build ``variant``'s image; its tag. podman: from the bootstrapped base, no registry."""
    dockerfile, tag = IMAGES[variant]
    cmd = [engine, "build", "-f", dockerfile, "-t", tag, *pip_secrets()]
    if engine == "podman":
        ensure_tools()
        if base is None:
            bootstrap(BASE, "bookworm", BASE_PACKAGES)
            base = BASE
        cmd += ["--isolation=chroot", "--pull=never", "--network=host", "--layers",
                "--ignorefile", f"{dockerfile}.dockerignore"]
    if base is not None:
        cmd += ["--build-arg", f"BASE_IMAGE={base}"]
    start = time.monotonic()
    run([*cmd, "."], cwd=ROOT, env=podman_env() if engine == "podman" else None)
    timed(f"{tag} built", time.monotonic() - start)
    log(f"{tag}: {image_size(tag, engine) / 1e9:.2f} GB")
    return tag


def image_size(tag: str, engine: str) -> int:
    out = run([engine, "image", "inspect", "--format", "{{.Size}}", tag], capture=True,
              env=podman_env() if engine == "podman" else None)
    return int(out.strip())


def container(engine: str, tag: str, *args: str, mounts: Sequence[tuple[Path, str, str]] = (),
              env: dict[str, str] | None = None) -> None:
    """``ENGINE run --rm --network=none`` of ``tag``: no network (the image holds everything a run
    needs; its loopback is its own, so rendezvous ports never meet another process's)."""
    cmd = [engine, "run", "--rm", "--network=none"]
    for src, dst, mode in mounts:
        cmd += ["-v", f"{src}:{dst}:{mode}"]
    for key, value in (env or {}).items():
        cmd += ["-e", f"{key}={value}"]
    run([*cmd, tag, *args], env=podman_env() if engine == "podman" else None)


def test_cpu(engine: str, test_mark: str) -> None:
    """In the CPU image: ``exp=pat_smoke`` trains and evaluates (its run dir on this machine), then
    the test suite (``-m test_mark``) runs against the image's code and libraries."""
    _, tag = IMAGES["cpu"]
    if not image_exists(tag, engine):
        fail(f"no image {tag}: build it first (make image)")
    out = STATE / "image-test"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    start = time.monotonic()
    container(engine, tag, "python", "-m", "trainer.train", "exp=pat_smoke", "run_dir=/out/pat_smoke",
              mounts=[(out, "/out", "rw")], env={"HF_HUB_OFFLINE": "1"})
    timed("pat_smoke in the image", time.monotonic() - start)
    run_dir = out / "pat_smoke"
    evals = [r for r in _jsonl(run_dir / "metrics.jsonl") if r.get("kind") == "eval"]
    if not (run_dir / "model_final.safetensors").is_file() or not evals:
        fail(f"pat_smoke in {tag}: no model_final.safetensors or no evaluation in {run_dir}/metrics.jsonl")
    log(f"pat_smoke: trained; {len(evals)} evaluations, the last: {_brief(evals[-1])}")
    start = time.monotonic()
    container(engine, tag, "python", "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", test_mark, "tests",
              mounts=[(ROOT / "tests", "/opt/reid/tests", "ro")])
    timed(f"tests -m '{test_mark}' in the image", time.monotonic() - start)


def _jsonl(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def _brief(record: dict[str, object]) -> str:
    results = record.get("results")
    return "; ".join(f"{target} mAP {r.get('mAP', float('nan')):.4f} R1 {r.get('R1', float('nan')):.4f}"
                     for target, r in results.items()) if isinstance(results, dict) else str(record)


GPU_CHECK = """
import sys
import deepspeed, faiss, torch
cuda = torch.version.cuda
print('torch', torch.__version__, 'built for CUDA', cuda, '| faiss', faiss.__version__, 'GPUs seen by faiss',
      faiss.get_num_gpus(), '| deepspeed', deepspeed.__version__, '| CUDA device', torch.cuda.is_available())
assert hasattr(faiss, 'StandardGpuResources'), 'faiss is the CPU build'
assert cuda == sys.argv[1], f'torch is built for CUDA {cuda}, the image declares {sys.argv[1]}'
"""


def check_gpu(engine: str) -> None:
    """The GPU image imports torch (built for the CUDA it declares), faiss with its GPU half, DeepSpeed."""
    _, tag = IMAGES["gpu"]
    if not image_exists(tag, engine):
        fail(f"no image {tag}: build it first (make image-gpu)")
    container(engine, tag, "python", "-c", GPU_CHECK, TORCH_CUDA)


# -- Apptainer -------------------------------------------------------------------------------------------

def sif_path() -> Path:
    return STATE / "reid-cpu.sif"


AS_USER = 'chmod 666 /dev/fuse && exec setpriv --reuid="$0" --regid="$0" --init-groups --reset-env -- "$@"'
"""Root in the node opens /dev/fuse to its user, then becomes that user (setpriv, no shell between):
Apptainer mounts a SIF with squashfuse when unprivileged, and /dev/fuse is root's only on this
machine. The node's /dev is its own tmpfs: the machine's /dev/fuse is not touched."""


def node(*args: str | os.PathLike[str], mounts: Sequence[Path] = (), user: int | None = None,
         workdir: Path | None = None) -> None:
    """Run ``args`` on the Apptainer node (a ``--privileged`` podman container from Debian sid, host
    network, ``mounts`` at the same paths), as root or as ``user``. Root cannot run Apptainer there:
    it asks for every capability, and this machine withholds CAP_SYS_RESOURCE from root."""
    bootstrap(NODE, "sid", NODE_PACKAGES, user_uid=NODE_UID)
    cmd: list[str | os.PathLike[str]] = ["podman", "run", "--rm", "--privileged", "--network=host"]
    for m in mounts:
        cmd += ["-v", f"{m}:{m}"]
    if workdir is not None:
        cmd += ["-w", workdir]
    cmd.append(NODE)
    if user is not None:
        cmd += ["sh", "-c", AS_USER, str(user)]
    run([*cmd, *args], env=podman_env())


def build_sif() -> Path:
    """The CPU image as a SIF, from its OCI archive (an archive keeps the image's ENV: PATH to the venv,
    DS_ACCELERATOR; a SIF built from an unpacked root filesystem would not)."""
    _, tag = IMAGES["cpu"]
    if not image_exists(tag):
        fail(f"no image {tag}: build it first (make image)")
    sif, archive, tmp = sif_path(), STATE / "reid-cpu.oci.tar", STATE / "apptainer-tmp"
    start = time.monotonic()
    archive.unlink(missing_ok=True)
    run(["podman", "save", "--format", "oci-archive", "-o", archive, tag], env=podman_env())
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        node("env", f"APPTAINER_TMPDIR={tmp}", "apptainer", "build", "--force", "--disable-cache", sif,
             f"oci-archive://{archive}", mounts=[STATE])
    finally:
        archive.unlink(missing_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    timed(f"{sif} built", time.monotonic() - start)
    log(f"{sif}: {sif.stat().st_size / 1e9:.2f} GB")
    return sif


COMPARE = """
import sys
from safetensors.torch import load_file
a, b = load_file(sys.argv[1]), load_file(sys.argv[2])
assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
diff = {k: (a[k].double() - b[k].double()).abs().max().item() for k in a}
worst = max(diff, key=diff.get)
same = all(a[k].equal(b[k]) for k in a)
print(f'{len(a)} tensors; bit-identical: {same}; largest |difference|: {diff[worst]:.3g} ({worst})')
sys.exit(0 if diff[worst] == 0 else 1)
"""


def apptainer_run(venv: Path) -> None:
    """``launch/slurm.py --cluster local --tasks-per-node 2 --apptainer SIF exp=pat_smoke`` on the node,
    the launcher in this checkout's venv (checkout, venv and its python mounted at their paths, as a
    cluster's shared file system would), the ranks in the SIF, the run dir on this machine; then the
    same command without the container, here; the final weights must be identical."""
    sif = sif_path()
    if not sif.is_file():
        fail(f"no {sif}: make it first (make image-sif)")
    python = venv / "bin" / "python"
    if not python.is_file():
        fail(f"no {python}: make venv first")
    prefix = Path(run([python, "-c", "import sys; print(sys.base_prefix)"], capture=True).strip())
    work = STATE / "apptainer-run"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    os.chown(work, NODE_UID, NODE_UID)
    common = ["launch/slurm.py", "--cluster", "local", "--tasks-per-node", "2", "--wait", "--progress-every", "0"]
    data = f"data.cache_dir={work / 'data'}"
    contained = [*common, "--apptainer", str(sif), "exp=pat_smoke", f"run_dir={work / 'apptainer'}", data]
    node(python, *contained, "--dry-run", mounts=[ROOT, prefix], user=NODE_UID, workdir=ROOT)  # the ranks' command
    start = time.monotonic()
    node(python, *contained, mounts=[ROOT, prefix], user=NODE_UID, workdir=ROOT)
    timed("pat_smoke, 2 ranks in the SIF", time.monotonic() - start)
    start = time.monotonic()
    run([python, *common, "exp=pat_smoke", f"run_dir={work / 'host'}", data], cwd=ROOT)
    timed("pat_smoke, 2 ranks without a container", time.monotonic() - start)
    final = "model_final.safetensors"
    run([python, "-c", COMPARE, work / "apptainer" / final, work / "host" / final])


def clean(everything: bool) -> None:
    """Remove the trainer images and the SIF; the build cache (the builder stage's layers) stays for
    the next build. With ``everything``: also the cache, the base and node images and .cache/containers."""
    sif_path().unlink(missing_ok=True)
    if shutil.which("podman") is None:
        return
    tags = [tag for _, tag in IMAGES.values()] + ([BASE, NODE] if everything else [])
    present = [t for t in tags if image_exists(t)]
    if present:
        run(["podman", "rmi", "--force", *present], env=podman_env())
    if everything:
        run(["podman", "image", "prune", "--force"], env=podman_env())  # untagged: the build cache
        shutil.rmtree(STATE, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="docker/images.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build an image")
    b.add_argument("variant", choices=sorted(IMAGES))
    b.add_argument("--engine", choices=("podman", "docker"), default="podman")
    b.add_argument("--base", default=None,
                   help="BASE_IMAGE (podman: the bootstrapped Debian; docker: the Dockerfile's, python:3.11-slim)")
    t = sub.add_parser("test", help="train pat_smoke and run the tests in the CPU image")
    t.add_argument("variant", choices=["cpu"])
    t.add_argument("--engine", choices=("podman", "docker"), default="podman")
    t.add_argument("-m", dest="mark", default=FAST_TESTS, help=f"pytest marker expression (default: {FAST_TESTS!r})")
    c = sub.add_parser("check", help="import torch, faiss-gpu and DeepSpeed in the GPU image")
    c.add_argument("variant", choices=["gpu"])
    c.add_argument("--engine", choices=("podman", "docker"), default="podman")
    sub.add_parser("sif", help="the CPU image as an Apptainer SIF (.cache/containers/reid-cpu.sif)")
    a = sub.add_parser("apptainer-run",
                       help="pat_smoke through launch/slurm.py --apptainer, compared with the run without a container")
    a.add_argument("--venv", type=Path, default=ROOT / ".venv")
    k = sub.add_parser("clean", help="remove the trainer images and the SIF")
    k.add_argument("--all", action="store_true", help="also the base and node images and .cache/containers")
    args = p.parse_args(argv)
    if args.command == "build":
        build(args.variant, args.engine, args.base)
    elif args.command == "test":
        test_cpu(args.engine, args.mark)
    elif args.command == "check":
        check_gpu(args.engine)
    elif args.command == "sif":
        build_sif()
    elif args.command == "apptainer-run":
        apptainer_run(args.venv.resolve())
    else:
        clean(args.all)
    return 0


if __name__ == "__main__":
    sys.exit(main())
