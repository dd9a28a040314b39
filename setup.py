"""One import namespace, `rlhf_pipeline`, over the repository's own folders: `rlhf_pipeline.stages` is stages/,
`rlhf_pipeline.flows` is flows/, and infra/ ships as package data, so that `rlhf deploy` finds its Kubernetes job
template in an installed wheel. Packages are found under each folder, so that a new sub-package needs no entry
here. Everything else about the distribution is in pyproject.toml."""

from setuptools import find_packages, setup

FOLDERS = {"rlhf_pipeline.stages": "stages", "rlhf_pipeline.flows": "flows"}

package_dir = {"rlhf_pipeline.infra": "infra", "rlhf_pipeline.infra.kubernetes": "infra/kubernetes"}
for package, folder in FOLDERS.items():
    package_dir[package] = folder
    for sub in find_packages(folder):
        package_dir[f"{package}.{sub}"] = f"{folder}/{sub.replace('.', '/')}"

setup(packages=list(package_dir), package_dir=package_dir)
