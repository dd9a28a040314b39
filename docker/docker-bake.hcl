# docker buildx bake -f docker/docker-bake.hcl [--set '*.args.BASE_IMAGE=...']   (buildx >= 0.12: matrix)
variable "TAG" { default = "latest" }
variable "PREFIX" { default = "rlhf-" }
variable "BASE_IMAGE" { default = "nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04" }
variable "TORCH_INDEX_URL" { default = "https://download.pytorch.org/whl/cu128" }

group "default" {
  targets = ["prepare", "sft", "reward", "rl", "evaluate", "orchestrator"]
}

# One image per Dockerfile target: the five stages and the orchestrator.
target "image" {
  name       = tgt
  matrix     = { tgt = ["prepare", "sft", "reward", "rl", "evaluate", "orchestrator"] }
  context    = "."
  dockerfile = "docker/Dockerfile"
  target     = tgt
  tags       = ["${PREFIX}${tgt}:${TAG}"]
  args = {
    BASE_IMAGE      = BASE_IMAGE
    TORCH_INDEX_URL = TORCH_INDEX_URL
  }
}
