"""The whole-model steps that test_model_bench.py times and profile_model.py dissects: a randomly
initialised ViT-B/16 VitaCLIP with 400 class-specific prompts, clips of 8 x 224 x 224, bf16
autocast. Each builder sets the model's mode and returns a step without arguments."""
import torch
import torch.nn.functional as F

from vitaclip import VitaCLIP, VitaCLIPConfig

FRAMES, N_CLASSES = 8, 400


def make_model(backend: str = "auto") -> VitaCLIP:
    classes = [f"action number {i}" for i in range(N_CLASSES)]
    return VitaCLIP(VitaCLIPConfig.preset("ViT-B/16"), classes, backend=backend).cuda()


def random_clips(batch: int) -> torch.Tensor:
    return torch.randn(batch, 3, FRAMES, 224, 224, device="cuda")


def inference_step(model: VitaCLIP, batch: int):
    clips = random_clips(batch)
    model.eval()

    def step():
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
            model(clips)
    return step


def training_step(model: VitaCLIP, batch: int, vision_only: bool = False):
    """Forward and backward into the trainable parameters. vision_only: the clips are scored
    against fixed text features (the target's "vision training step"); otherwise the logits
    come from the model, its text side of 400 class prompts included."""
    clips = random_clips(batch)
    labels = torch.randint(0, N_CLASSES, (batch,), device="cuda")
    text = F.normalize(torch.randn(N_CLASSES, model.config.embed_dim, device="cuda"), dim=-1)
    model.train()

    def logits():
        if not vision_only:
            return model(clips)
        features = F.normalize(model.encode_video(clips).float(), dim=-1)
        return model.logit_scale.exp() * features @ text.t()

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = F.cross_entropy(logits(), labels)
        loss.backward()
        model.zero_grad(set_to_none=True)
    return step


def text_step(model: VitaCLIP):
    """The text side of a training step alone: the class prompts' features, back into the context."""
    model.train()

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            features = model.encode_text()
        features.float().square().mean().backward()
        model.zero_grad(set_to_none=True)
    return step
