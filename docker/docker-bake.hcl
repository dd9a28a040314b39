# docker buildx bake -f docker/docker-bake.hcl [--set *.args.BASE_IMAGE=...]
variable "TAG" { default = "latest" }
variable "PREFIX" { default = "rlhf-" }
variable "BASE_IMAGE" { default = "nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04" }
variable "TORCH_INDEX_URL" { default = "https://download.pytorch.org/whl/cu128" }

group "default" {
  targets = ["prepare", "sft", "reward", "rl", "evaluate", "orchestrator"]
}

target "_common" {
  context    = "."
  dockerfile = "docker/Dockerfile"
  args = {
    BASE_IMAGE      = BASE_IMAGE
    TORCH_INDEX_URL = TORCH_INDEX_URL
  }
}

target "prepare" {
  inherits = ["_common"]
  target   = "prepare"
  tags     = ["${PREFIX}prepare:${TAG}"]
}
target "sft" {
  inherits = ["_common"]
  target   = "sft"
  tags     = ["${PREFIX}sft:${TAG}"]
}
target "reward" {
  inherits = ["_common"]
  target   = "reward"
  tags     = ["${PREFIX}reward:${TAG}"]
}
target "rl" {
  inherits = ["_common"]
  target   = "rl"
  tags     = ["${PREFIX}rl:${TAG}"]
}
target "evaluate" {
  inherits = ["_common"]
  target   = "evaluate"
  tags     = ["${PREFIX}evaluate:${TAG}"]
}
target "orchestrator" {
  inherits = ["_common"]
  target   = "orchestrator"
  tags     = ["${PREFIX}orchestrator:${TAG}"]
}
