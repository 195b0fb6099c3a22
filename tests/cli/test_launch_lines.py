"""Every launch line the docs give runs its config at a world size whose batch arithmetic divides.

A GPU user copies a line from README.md, docs/OPERATIONS.md or a batch script's header and expects
it to start; a global batch that does not divide is refused only after the ranks joined (minutes
into a cluster job). So each line's world size is read from the line itself, as its launcher or
batch script would count it, and checked with the project's own loader
(``load_config`` + ``TrainConfig.accumulation``), with the line's ``--set`` and ``OVERRIDES``:

- ``deepspeed --num_gpus G [--num_nodes N]``: G x N ranks;
- ``sbatch [-N N] [--gpus-per-node G] [--ntasks-per-node T] SCRIPT``: N nodes (else the script's
  ``#SBATCH --nodes``) x one rank per GPU (launch/common.sh ``umbrella_ranks``; a T that differs
  from G is refused there, so here too), else T, else ``PROCS_PER_NODE``, else 1;
- ``srun -n N`` / ``--ntasks N`` or ``-N N --ntasks-per-node T``;
- ``umbrella-train`` / ``python -m umbrella_ds.train`` alone: 1.

Only lines that name a config are checked (eval lines take ``--checkpoint``). A config path that
does not exist fails the test unless it is one of the placeholders below or a config a documented
command writes (``--from-umbrella-config ... --out``), and every shipped config
but the demo's (which ``make demo`` launches) must be launched by some line.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from umbrella_ds.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[2]
DOCS = ["README.md", "docs/OPERATIONS.md"]
SCRIPTS = ["launch/train.sbatch", "launch/train-srun.sbatch"]
PLACEHOLDERS = {"configs/X.yaml"}  # syntax lines: `--config configs/X.yaml [--set key=value ...]`
LAUNCHED_ELSEWHERE = {"configs/demo.yaml"}  # `make demo`: 2 ranks (umbrella_ds/demo.py)


@dataclass
class Launch:
    """One documented command: where it is, its config, its overrides, its world size."""

    where: str
    command: str
    config: str
    overrides: list[str] = field(default_factory=list)
    world_size: int = 1


def _commands_in_markdown(text: str) -> list[str]:
    commands = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        commands += [line.strip() for line in joined.splitlines() if line.strip()]
    return commands


def _commands_in_script_header(text: str) -> list[str]:
    """The usage examples in a batch script's leading comment (`#   CONFIG=... sbatch ...`)."""
    header = []
    for line in text.splitlines()[1:]:
        if not line.startswith("#") or line.startswith("#SBATCH"):
            break
        header.append(line[1:])
    joined = re.sub(r"\\\n\s*", " ", "\n".join(header))
    return [line.strip() for line in joined.splitlines() if "sbatch" in line.split()]


def _words(command: str) -> list[str]:
    command = command.split(" # ")[0]  # a trailing comment
    try:
        return shlex.split(command)
    except ValueError:
        return []


def _option(words: list[str], *names: str) -> str | None:
    """The value of ``--name V`` or ``--name=V`` (last one wins, as with the real parsers)."""
    value = None
    for i, word in enumerate(words):
        for name in names:
            if word == name and i + 1 < len(words):
                value = words[i + 1]
            elif word.startswith(name + "=") and name.startswith("--"):
                value = word.split("=", 1)[1]
    return value


def _count(value: str | None) -> int | None:
    """``4`` or ``TYPE:4`` (``--gpus-per-node=a100:4``)."""
    return None if value is None else int(value.rsplit(":", 1)[-1])


def _sets(words: list[str]) -> list[str]:
    """Every pair after a ``--set`` (one ``--set`` may take several)."""
    pairs, taking = [], False
    for word in words:
        if word == "--set":
            taking = True
        elif word.startswith("-") or word.startswith("["):
            taking = False
        elif taking and "=" in word:
            pairs.append(word)
    return pairs


def _script_nodes(script: str) -> int:
    found = re.search(r"^#SBATCH --nodes=(\d+)$", (REPO / script).read_text(), flags=re.M)
    return int(found.group(1)) if found else 1


def _sbatch_world(words: list[str], env: dict[str, str], command: str) -> int:
    at = words.index("sbatch")
    script = next(w for w in words[at:] if w.endswith(".sbatch"))
    options = words[at : words.index(script)]
    nodes = _count(_option(options, "-N", "--nodes")) or _script_nodes(script)
    gpus = _count(_option(options, "--gpus-per-node"))
    tasks = _count(_option(options, "--ntasks-per-node"))
    if gpus:
        assert tasks in (None, gpus), f"launch/common.sh refuses {tasks} ranks per node with {gpus} GPUs: {command}"  # fmt: skip
        assert env.get("PROCS_PER_NODE", str(gpus)) == str(gpus), command
        return nodes * gpus
    return nodes * (tasks or int(env.get("PROCS_PER_NODE", "1")))


def _world(words: list[str], env: dict[str, str], command: str) -> int:
    if "sbatch" in words:
        return _sbatch_world(words, env, command)
    program = words[0]
    if program == "deepspeed":
        gpus = _count(_option(words, "--num_gpus"))
        assert gpus, f"deepspeed without --num_gpus: the world size depends on the machine: {command}"  # fmt: skip
        return gpus * (_count(_option(words, "--num_nodes")) or 1)
    if program == "srun":
        total = _count(_option(words, "-n", "--ntasks"))
        if total:
            return total
        return (_count(_option(words, "-N", "--nodes")) or 1) * (
            _count(_option(words, "--ntasks-per-node")) or 1
        )
    single = program == "umbrella-train" or words[:3] in (
        ["python", "-m", "umbrella_ds.train"],
        ["python", "-m", "umbrella_ds.train.cli"],
    )
    assert single, f"a launcher this test does not know (teach it): {command}"
    return 1


def parse_launch(where: str, command: str) -> Launch | None:
    """The launch a command line describes, or None when it names no config."""
    words = _words(command)
    env: dict[str, str] = {}
    while words and re.match(r"^[A-Z_][A-Z0-9_]*=", words[0]):
        key, value = words.pop(0).split("=", 1)
        env[key] = value
    config = env.get("CONFIG") or _option(words, "--config")
    if not words or config is None:
        return None
    overrides = _sets(words) + env.get("OVERRIDES", "").split()
    return Launch(where, command, config, overrides, _world(words, env, command))


def documented_launches() -> list[Launch]:
    launches = []
    for name in DOCS:
        for command in _commands_in_markdown((REPO / name).read_text()):
            launches.append(parse_launch(name, command))
    for name in SCRIPTS:
        for command in _commands_in_script_header((REPO / name).read_text()):
            launches.append(parse_launch(name, command))
    skip = PLACEHOLDERS | _written_by_the_docs()
    return [launch for launch in launches if launch and launch.config not in skip]


def _written_by_the_docs() -> set[str]:
    """Configs a documented command writes (`umbrella-train --from-umbrella-config ... --out X`):
    they exist only once it ran, so the README test, which runs both lines, checks them."""
    written = set()
    for name in DOCS:
        for command in _commands_in_markdown((REPO / name).read_text()):
            words = _words(command)
            if "--from-umbrella-config" in words and (out := _option(words, "--out")):
                written.add(out)
    return written


LAUNCHES = documented_launches()


def test_the_docs_launch_every_shipped_config():
    shipped = {f"configs/{p.name}" for p in (REPO / "configs").glob("*.yaml")}
    launched = {launch.config for launch in LAUNCHES}
    assert launched <= shipped, f"docs launch configs that do not exist: {launched - shipped}"
    assert shipped - LAUNCHED_ELSEWHERE <= launched, (
        f"no documented launch line for {shipped - LAUNCHED_ELSEWHERE - launched}"
    )
    # The lines this issue found refused are among those checked.
    worlds = {(launch.where, launch.config, launch.world_size) for launch in LAUNCHES}
    assert ("README.md", "configs/t1_sex_0.5b.yaml", 8) in worlds, worlds
    assert any(w[1] == "configs/rsfmri_0.5b.yaml" and w[2] == 16 for w in worlds), worlds


@pytest.mark.parametrize(
    "launch",
    LAUNCHES,
    ids=[f"{launch.where}:{launch.config}@{launch.world_size}" for launch in LAUNCHES],
)
def test_each_documented_launch_divides_its_global_batch(launch: Launch):
    cfg = load_config(REPO / launch.config, launch.overrides)
    try:
        accumulation = cfg.train.accumulation(launch.world_size)
    except ConfigError as e:
        pytest.fail(f"{launch.where}: `{launch.command}` is refused: {e}")
    assert accumulation >= 1


def test_the_parser_sees_what_the_launchers_count():
    """Lines the docs once had, and the world sizes their launchers start."""
    cases = {
        "deepspeed --num_gpus 8 umbrella_ds/train/__main__.py --config configs/t1_sex_0.5b.yaml": 8,
        "deepspeed --num_nodes 2 --num_gpus 8 x.py --config c.yaml": 16,
        'CONFIG=c.yaml PROCS_PER_NODE=4 OVERRIDES="a=1" sbatch -N 2 --ntasks-per-node=4 --gpus-per-node=4 launch/train.sbatch': 8,
        "CONFIG=c.yaml sbatch --gpus-per-node=a100:8 launch/train.sbatch": 16,  # --nodes=2 in the script
        "CONFIG=c.yaml sbatch -N 3 launch/train-srun.sbatch": 3,
        "srun -N 2 --ntasks-per-node 4 python -m umbrella_ds.train --config c.yaml": 8,
        "umbrella-train --config c.yaml --set a=1 b=2 --set c=3": 1,
    }  # fmt: skip
    for command, world in cases.items():
        launch = parse_launch("test", command)
        assert launch is not None and launch.world_size == world, (command, launch)
    assert parse_launch(
        "t", "umbrella-train --config c.yaml --set a=1 b=2 --set c=3"
    ).overrides == [
        "a=1",
        "b=2",
        "c=3",
    ]
    with pytest.raises(AssertionError, match="refuses 1 ranks per node with 4 GPUs"):
        parse_launch(
            "t", "CONFIG=c.yaml sbatch --ntasks-per-node=1 --gpus-per-node=4 launch/train.sbatch"
        )


def test_the_old_readme_line_is_refused_naming_the_micro_batches_that_divide():
    """README's `deepspeed --num_gpus 8` with the config's former micro-batch 64: 256 / (64 x 8)."""
    cfg = load_config(REPO / "configs/t1_sex_0.5b.yaml", ["train.micro_batch=64"])
    with pytest.raises(ConfigError) as e:
        cfg.train.accumulation(8)
    assert str(e.value) == (
        "train.global_batch=256 is not divisible by train.micro_batch=64 x world size 8; "
        "micro-batches that divide: 1, 2, 4, 8, 16, 32"
    )
    with pytest.raises(ConfigError, match=r"no micro-batch divides: make train\.global_batch a multiple of 3$"):  # fmt: skip
        cfg.train.accumulation(3)
    big = load_config(REPO / "configs/t1_sex_0.5b.yaml", ["train.global_batch=5040", "train.micro_batch=16"])  # fmt: skip
    with pytest.raises(ConfigError, match=r"divide: 1, 2, 3, 4, 5, 6, \.\.\., 210, 252, 315, 420, 630, 1260$"):  # fmt: skip
        big.train.accumulation(4)
