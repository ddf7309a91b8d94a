import numpy as np
import pytest
import torch
from PIL import Image

from monai.transforms import LoadImage

from medssl.transforms import AsChannels


@pytest.fixture(scope="module")
def nuclei_png(nuclei_dir):
    return sorted((nuclei_dir / "images").glob("*.png"))[0]


@pytest.mark.parametrize("mode", ["RGBA", "RGB", "L", "LA"])
@pytest.mark.parametrize("channels", [1, 3])
def test_any_png_layout_loads_as_the_configured_channels(tmp_path, nuclei_png, mode, channels):
    src = Image.open(nuclei_png)
    path = tmp_path / f"img_{mode}.png"
    src.convert(mode).save(path)
    img = LoadImage(image_only=True, ensure_channel_first=True)(str(path))
    out = AsChannels(channels)(img)
    assert out.shape == (channels, *img.shape[1:])
    grey = np.asarray(src.convert("L"), dtype=np.float32).T  # PIL reader: (W, H) spatial order
    if channels == 1:
        np.testing.assert_allclose(np.asarray(out[0]), grey, atol=1.0)
    elif mode in ("L", "LA"):
        for c in range(3):
            np.testing.assert_array_equal(np.asarray(out[c]), grey)
    else:
        rgb = np.asarray(src.convert("RGB"), dtype=np.float32).transpose(2, 1, 0)
        np.testing.assert_array_equal(np.asarray(out), rgb)


def test_unsupported_channel_count_is_refused():
    with pytest.raises(ValueError, match=r"shape \(5, 4, 4\) into 3 channel"):
        AsChannels(3)(torch.zeros(5, 4, 4))
    with pytest.raises(ValueError, match="1 or 3"):
        AsChannels(2)


def test_select_modality_reads_one_modality_of_a_stacked_study_or_passes_it_alone():
    """semi_cml's inference input: a 4-channel study (MONAI Label's one image per study) -> the modality's
    channel; a 1-channel volume (the BraTS folder layout) passes unchanged; 3 channels is refused naming the file."""
    from monai.data import MetaTensor

    from medssl.data import DataError
    from medssl.transforms import SelectModalityd

    stacked = MetaTensor(torch.arange(4.0).reshape(4, 1, 1, 1).expand(4, 2, 3, 2).clone(),
                         meta={"filename_or_obj": "case.nii.gz"})
    out = SelectModalityd("image", modality="t2")({"image": stacked})["image"]
    assert out.shape == (1, 2, 3, 2) and torch.all(out == 3) and isinstance(out, MetaTensor)
    alone = stacked[:1]
    assert SelectModalityd("image", modality="t2")({"image": alone})["image"] is alone
    with pytest.raises(DataError, match=r"case.nii.gz: 3 channels; expected 1 \(the flair volume\) or 4"):
        SelectModalityd("image", modality="flair")({"image": stacked[:3]})
    with pytest.raises(ValueError, match="modality"):
        SelectModalityd("image", modality="pd")
