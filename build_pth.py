"""setuptools build hook: ship binllm_autoload.pth at the top of site-packages.

Wheels (`pip install .`) get it from build_lib; editable installs (`pip install -e .`) have no
build_lib in the wheel, so it is written straight into the editable wheel's root (the
`install_lib` setuptools' editable_wheel points the install commands at). Declared in
pyproject.toml under [tool.setuptools.cmdclass]; see binllm_autoload.py for what the hook does.
"""

from pathlib import Path

from setuptools.command.build_py import build_py

PTH = "binllm_autoload.pth"


class BuildPyWithPth(build_py):
    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            target = Path(self.get_finalized_command("install").install_lib)
        else:
            target = Path(self.build_lib)
        target.mkdir(parents=True, exist_ok=True)
        self.copy_file(str(Path(__file__).with_name(PTH)), str(target / PTH))
