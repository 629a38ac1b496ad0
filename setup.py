"""Build configuration beside pyproject.toml (which holds the metadata): the presets live once, in the
top-level configs/, and ship inside the package as gdpo/configs/, where an installed wheel finds them
(gdpo.paths.PRESETS)."""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


class BuildPyWithPresets(build_py):
    def run(self):
        super().run()
        src = ROOT / "configs"
        dst = Path(self.build_lib) / "gdpo" / "configs"
        for f in sorted(src.rglob("*")):
            if f.is_file() and f.suffix in (".yaml", ".json"):
                target = dst / f.relative_to(src)
                target.parent.mkdir(parents=True, exist_ok=True)
                self.copy_file(str(f), str(target))


setup(cmdclass={"build_py": BuildPyWithPresets})
