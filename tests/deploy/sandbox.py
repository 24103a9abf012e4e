"""deploy/Dockerfile carried out without a container runtime, in a temporary folder.

Owns: a file tree laid out as the image's (``/opt/qnp`` becomes ``<root>/opt/qnp``),
made by following the build stage's instructions: its COPY lines copy from the
repository (only what ``.dockerignore`` lets into the build context), its RUN lines
make the virtual environment and pip-install the copied tree into it; then the runtime
stages' ENV, ENTRYPOINT and CMD give the command line and environment to start it.

To stay fast and offline the venv sees the test venv's site-packages (a ``.pth``
line) and pip runs ``--no-deps --no-build-isolation --no-index``: the dependencies
are the test venv's, but the project itself is built from the copied files and
installed into the sandbox, so a file the Dockerfile forgets to copy, or one the
package does not ship (migrations, Lua scripts), breaks the sandbox as it would break
the image. Only the RUN forms deploy/Dockerfile uses are understood; a new form fails
loudly instead of being skipped.
"""

from __future__ import annotations

import os
import shlex
import shutil
import site
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from tests.deploy import dockerfile
from tests.deploy.manifests import DOCKERFILE, ROOT

# Runtime-stage RUN lines need root (users, ownership); the sandbox does not run them,
# but nothing in them may install a compiler into the final image.
COMPILERS = ("gcc", "g++", "clang", "build-essential", "cc ", "make ", "cargo", "rustc")


@dataclass
class Sandbox:
    root: Path
    stages: list[dockerfile.Stage]
    env_by_target: dict[str, dict[str, str]] = field(default_factory=dict)
    log: list[str] = field(default_factory=list)

    def at(self, image_path: str) -> Path:
        """Where the image's absolute ``image_path`` is in the sandbox."""
        assert image_path.startswith("/"), image_path
        return self.root / image_path.lstrip("/")

    def entrypoint(self, target: str) -> list[str]:
        chain = dockerfile.stage_chain(self.stages, target)
        found = dockerfile.effective(chain, "ENTRYPOINT")
        assert found is not None, "no ENTRYPOINT"
        words = found.exec_form()
        return [str(self.at(words[0])) if words[0].startswith("/") else words[0], *words[1:]]

    def cmd(self, target: str) -> list[str]:
        found = dockerfile.effective(dockerfile.stage_chain(self.stages, target), "CMD")
        assert found is not None, "no CMD"
        return found.exec_form()

    def env(self, target: str, extra: dict[str, str] | None = None) -> dict[str, str]:
        """The image's environment (paths moved into the sandbox), and nothing of ours:
        no PYTHONPATH leaks the worktree in."""
        return {**self.env_by_target[target], **(extra or {})}

    def run(self, target: str, args: list[str], env: dict[str, str] | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*self.entrypoint(target), *args], cwd=self.at("/tmp"), env=self.env(target, env),
            capture_output=True, text=True, timeout=timeout, check=False,
        )

    def popen(self, target: str, args: list[str], env: dict[str, str], log: Path
              ) -> subprocess.Popen[bytes]:
        with open(log, "ab") as out:
            return subprocess.Popen(
                [*self.entrypoint(target), *args], cwd=self.at("/tmp"),
                env=self.env(target, env), stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT,
            )


def _copy(box: Sandbox, instruction: dockerfile.Instruction, ignore: list[str]) -> None:
    sources, dest, from_stage = dockerfile.copy_sources(instruction)
    if from_stage is not None:
        # Same paths in both stages, one tree here: the files must already be there.
        for source in sources:
            assert box.at(source).exists(), f"COPY --from={from_stage} {source}: not built"
        return
    for source in sources:
        assert not dockerfile.ignored(ignore, source), \
            f"COPY {source}: .dockerignore keeps it out of the build context"
        origin = ROOT / source
        assert origin.exists(), f"COPY {source}: not in the repository"
        if origin.is_dir():
            target = box.at(dest)
            shutil.copytree(origin, target, dirs_exist_ok=True, ignore=lambda d, names: [
                n for n in names
                if dockerfile.ignored(ignore, str((Path(d) / n).relative_to(ROOT)))])
        else:
            target = box.at(dest) / origin.name if dest.endswith("/") else box.at(dest)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(origin, target)


def _run(box: Sandbox, instruction: dockerfile.Instruction, env: dict[str, str]) -> None:
    words = shlex.split(instruction.args)
    if words[:3] == ["python", "-m", "venv"] and len(words) == 4:
        venv = box.at(words[3])
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
        # The test venv's packages (dependencies, pip, setuptools) behind the venv's own.
        purelib = venv / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}"
        (purelib / "site-packages" / "qnp-test-deps.pth").write_text(
            "\n".join(site.getsitepackages()) + "\n")
        return
    if len(words) >= 3 and words[0].endswith("/bin/pip") and words[1] == "install":
        python = box.at(words[0]).parent / "python"
        targets = [str(box.at(w)) if w.startswith("/") else w for w in words[2:]]
        result = subprocess.run(
            [str(python), "-m", "pip", "install", "--quiet", "--no-deps",
             "--no-build-isolation", "--no-index", *targets],
            env={**os.environ, **env, "PYTHONPATH": ""}, cwd=box.root,
            capture_output=True, text=True, timeout=300, check=False,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        return
    raise AssertionError(f"the sandbox does not know how to RUN {instruction.args!r}")


def _mapped(box: Sandbox, value: str) -> str:
    if value.startswith("/"):
        return ":".join(str(box.at(p)) if p.startswith("/") else p for p in value.split(":"))
    return value


def _image_env(box: Sandbox, chain: list[dockerfile.Stage]) -> dict[str, str]:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(box.at("/tmp")),
           "LANG": "C.UTF-8"}
    for stage in chain:
        for instruction in stage.all("ENV"):
            for name, value in dockerfile.env_pairs(instruction).items():
                # Image paths move into the sandbox; the host's PATH stays as it is.
                env[name] = _mapped(box, value).replace("$PATH", env["PATH"])
    return env


def build(root: Path, targets: tuple[str, ...] = ("runtime", "demo")) -> Sandbox:
    """Follow deploy/Dockerfile into ``root`` for the given targets."""
    box = Sandbox(root, dockerfile.parse(DOCKERFILE))
    ignore = dockerfile.dockerignore(ROOT / ".dockerignore")
    box.at("/tmp").mkdir(parents=True)
    done: set[str] = set()
    for target in targets:
        chain = dockerfile.stage_chain(box.stages, target)
        for stage in chain:
            for instruction in stage.all("COPY"):
                _, _, from_stage = dockerfile.copy_sources(instruction)
                if from_stage is not None and from_stage not in done:
                    _build_stage(box, from_stage, ignore)
                    done.add(from_stage)
            if stage.name not in done:
                for instruction in stage.all("COPY"):
                    _copy(box, instruction, ignore)
                for instruction in stage.all("RUN"):
                    _runtime_run(box, instruction)
                done.add(stage.name or "")
        box.env_by_target[target] = _image_env(box, chain)
    return box


def _runtime_run(box: Sandbox, instruction: dockerfile.Instruction) -> None:
    """Runtime-stage RUN lines manage users and folders as root: the sandbox only makes
    the folders (``install -d``) and checks that no compiler is installed."""
    text = f" {instruction.args} "
    assert not any(f" {c}" in text for c in COMPILERS), f"a compiler in RUN {text!r}"
    for part in instruction.args.split("&&"):
        words = shlex.split(part)
        if words[:2] == ["install", "-d"]:
            for word in words[2:]:
                if word.startswith("/"):
                    box.at(word).mkdir(parents=True, exist_ok=True)


def _build_stage(box: Sandbox, name: str, ignore: list[str]) -> None:
    (stage,) = [s for s in box.stages if s.name == name]
    env: dict[str, str] = {}
    for instruction in stage.instructions:
        if instruction.keyword == "ENV":
            env.update(dockerfile.env_pairs(instruction))
        elif instruction.keyword == "COPY":
            _copy(box, instruction, ignore)
        elif instruction.keyword == "RUN":
            _run(box, instruction, env)
        box.log.append(f"{instruction.keyword} {instruction.args}")
