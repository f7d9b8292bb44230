"""Only what pyproject.toml cannot say: ship the top-level ``configs/`` presets inside the package.

``configs/`` stays at the repository top, where users read and copy it, and is installed as the
``pipeline.configs`` package data (read with :mod:`importlib.resources`, see ``pipeline/config.py``),
so a wheel install resolves the same configs as the checkout. pyproject's ``packages.find`` cannot
add a package from another folder, hence this file.
"""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["pipeline*"]), "pipeline.configs"],
    package_dir={"pipeline.configs": "configs"},
)
