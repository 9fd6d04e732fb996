"""Start-up of an embedding run: a timm encoder with a weight file is built on the meta device and
takes the file's tensors (no random initialisation), and gives the outputs of the model built,
initialised and then loaded by copy.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from embedstore.encoders import create_encoder
from embedstore.encoders._weights import load_into, load_state_dict
from embedstore.encoders.timm_hub import _has_meta_tensors, build_timm_model


def _save_random_weights(arch: str, folder, dtype: torch.dtype) -> None:
    import timm

    model = timm.create_model(arch, pretrained=False, num_classes=0)
    sd = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in model.state_dict().items()}
    folder.mkdir()
    save_file(sd, str(folder / "model.safetensors"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32-file", "bf16-file"])
@pytest.mark.parametrize(
    "arch",
    [
        "test_vit",  # all tensors come from the file
        "test_resnet",  # batch-norm buffers (int64 counters among them), channels-last CNN
        "test_coatnet",  # non-persistent buffers no file holds: built and initialised for real
    ],
)
def test_weights_from_a_file_give_the_outputs_of_an_initialised_model(tmp_path, arch, dtype, one_torch_thread):
    folder = tmp_path / "w"
    _save_random_weights(arch, folder, dtype)
    enc = create_encoder(f"timm:{arch}", weights=f"local-dir:{folder}")
    assert not _has_meta_tensors(enc.model)
    assert all(p.dtype == torch.float32 for p in enc.model.parameters())  # a bf16 file is cast, as a copy casts

    reference = build_timm_model(enc.cfg, {})  # random initialisation, then the file copied in
    load_into(reference.trunk, load_state_dict(folder / "model.safetensors"), "file", arch, ignore=("head.",))
    if enc.channels_last:
        reference = reference.to(memory_format=torch.channels_last)
    size = enc.cfg.input_size
    tiles = np.random.default_rng(0).integers(0, 256, (3, size, size, 3), dtype=np.uint8)
    batch = enc.transform()(tiles)
    with torch.inference_mode():
        expected = reference(batch).float().numpy()
    np.testing.assert_array_equal(enc.forward(batch), expected)


def test_has_meta_tensors_sees_buffers_and_plain_tensor_attributes():
    with torch.device("meta"):
        module = torch.nn.Linear(2, 2)
    module.weight = torch.nn.Parameter(torch.zeros(2, 2))
    module.bias = torch.nn.Parameter(torch.zeros(2))
    assert not _has_meta_tensors(module)
    module.register_buffer("table", torch.empty(3, device="meta"), persistent=False)
    assert _has_meta_tensors(module)
    del module.table
    module.cache = torch.empty(3, device="meta")  # a tensor attribute that is not a buffer
    assert _has_meta_tensors(module)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels-last"])
@pytest.mark.parametrize(
    ("resize_size", "interpolation", "tile_px"),
    [
        (248, "bicubic", 224),
        (224, "bicubic", 224),
        (256, "bilinear", 224),
        (240, "nearest", 200),
        (224, "bicubic", 235),
    ],
)
def test_transform_gives_the_values_of_the_textbook_formula(resize_size, interpolation, tile_px, channels_last):
    """Converted straight to the layout interpolation runs fastest on and normalised in place: the same bits."""
    import torch.nn.functional as F

    from embedstore.encoders._preprocess import TorchPreprocess

    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    tiles = np.random.default_rng(1).integers(0, 256, (4, tile_px, tile_px, 3), dtype=np.uint8)
    got = TorchPreprocess("t", 224, resize_size, mean, std, interpolation, channels_last)(tiles)

    x = torch.from_numpy(tiles).permute(0, 3, 1, 2).float()
    if x.shape[-1] != resize_size:
        kw = {"antialias": True, "align_corners": False} if interpolation != "nearest" else {}
        x = F.interpolate(x, size=(resize_size, resize_size), mode=interpolation, **kw).clamp(0.0, 255.0)
    o = round((resize_size - 224) / 2)
    x = x[:, :, o : o + 224, o : o + 224]
    expected = (x - torch.tensor(mean).view(1, 3, 1, 1) * 255.0) / (torch.tensor(std).view(1, 3, 1, 1) * 255.0)
    assert torch.equal(got, expected)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert got.is_contiguous(memory_format=fmt)
