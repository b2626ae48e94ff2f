"""The README against the repository: its "Inside" map names every module, kernel file and bench script (and
nothing that is gone), and CI runs exactly the README's test command."""
import re
import shlex
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text()


def inside_block():
    """The fenced block under "## Inside": the layout the README shows."""
    section = README.split("\n## Inside\n", 1)[1]
    return section.split("```\n", 2)[1]


def named_paths():
    """Every path the block's lines begin with (a module under cupynet/ is written relative to it)."""
    paths = set()
    for line in inside_block().splitlines():
        match = re.match(r"^(\s*)(\S+)", line)
        if not match or not re.search(r"[./]", match.group(2)):
            continue
        name = match.group(2)
        paths.add(f"cupynet/{name}" if match.group(1) and not name.startswith("tests/") else name)
    return paths


def test_the_map_names_every_module_and_bench_script():
    modules = {str(path.relative_to(REPO)) for path in (REPO / "cupynet").rglob("*.py")
               if "sample_data" not in path.parts and path != REPO / "cupynet" / "__init__.py"}
    scripts = {str(path.relative_to(REPO)) for pattern in ("*.py", "*.sh") for path in (REPO / "bench").glob(pattern)}
    missing = sorted((modules | scripts) - named_paths())
    assert not missing, f"README.md's 'Inside' map does not name: {missing}"


def test_the_map_names_only_what_exists():
    gone = sorted(path for path in named_paths() if not (REPO / path.rstrip("/")).exists())
    assert not gone, f"README.md's 'Inside' map names what the repository lacks: {gone}"


def test_the_map_names_every_kernel_file():
    kernels_line = re.search(r"^kernels/\s+CUDA sources: (.*?)\(\+ common\.cuh\)", inside_block(),
                             re.MULTILINE | re.DOTALL).group(1)
    named = set(re.findall(r"[a-z0-9_]+", kernels_line))
    missing = sorted(path.stem for path in (REPO / "kernels").glob("*.cu") if path.stem not in named)
    assert not missing, f"README.md's kernels/ line does not name: {missing}"


def test_ci_runs_the_readme_test_command_exactly():
    """.ci/run's last line is the README's second set-up command (the comment after it aside)."""
    ci_command = (REPO / ".ci" / "run").read_text().strip().splitlines()[-1]
    readme_commands = [line.split("#", 1)[0].strip() for line in README.splitlines()
                       if line.startswith("pip install -e ")]
    assert ci_command in readme_commands, (ci_command, readme_commands)
    assert shlex.split(ci_command)[-3:] == ["python", "-m", "pytest"]
