"""Every custom ``iteration_update`` honours ``amp`` as MONAI's SupervisedTrainer does: with ``amp`` true
its forward pass runs under autocast (CPU autocast, bfloat16, shows it here); with ``amp`` false it does
not. Each stage is built from the bundle's own layered configs and trained for one step on real data."""

import pytest
import torch
from ignite.engine import Events
from monai.bundle import ConfigParser

from medssl.bundles import bundle_path, stage_config_files

STAGES = [("dfr_barlow", "pretrain"), ("dfr_barlow", "train"), ("semi_cml", "train"), ("semi_cml", "prel"),
          ("cluster_resupervision", "train")]


def _parser(bundle, stage, data_dir, ckpt_dir, **overrides):
    parser = ConfigParser()
    parser.read_config([str(f) for f in stage_config_files(bundle_path(bundle), stage)])
    parser.update({"bundle_root": str(bundle_path(bundle)), "dataset_dir": str(data_dir), "ckpt_dir": str(ckpt_dir),
                   "device": "$torch.device('cpu')", "max_epochs": 1, "epoch_length": 1, "train#handlers": [],
                   "batch_size": 4, "init": "baseline", **overrides})
    return parser


def _trainer(bundle, stage, data_dir, ckpt_dir, amp):
    overrides = {}
    if stage == "prel":  # PReL starts from a contrastive-mutual-learning model: an untrained one will do
        first = _parser(bundle, "train", data_dir, ckpt_dir).get_parsed_content("network")
        overrides["cml_ckpt"] = str(ckpt_dir.parent / "cml.pt")
        torch.save(first.state_dict(), overrides["cml_ckpt"])
    return _parser(bundle, stage, data_dir, ckpt_dir, amp=amp, **overrides).get_parsed_content("train#trainer")


@pytest.mark.slow
@pytest.mark.parametrize("bundle, stage", STAGES)
def test_custom_iterations_run_their_forward_pass_under_autocast(bundle, stage, brats_copy, nuclei_copy, tmp_path):
    data = nuclei_copy(12) if bundle == "dfr_barlow" else brats_copy(4)
    seen = {}
    for amp in (True, False):
        trainer = _trainer(bundle, stage, data, tmp_path / f"ckpt_{amp}", amp)
        states, inside = [], []  # recorded within the trainer's iterations only (not, e.g., PReL's teacher choice)
        trainer.add_event_handler(Events.ITERATION_STARTED, lambda e: inside.append(True))
        trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: inside.clear())
        convs = [m for m in trainer.network.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d))]

        def record(module, inputs, output):
            if inside:
                states.append((torch.is_autocast_enabled("cpu"), output.dtype))

        hooks = [m.register_forward_hook(record) for m in convs]
        trainer.run()
        for h in hooks:
            h.remove()
        assert states, "no convolution ran"
        seen[amp] = states
        assert torch.isfinite(torch.as_tensor(trainer.state.output[0]["loss"]
                                              if isinstance(trainer.state.output, list) else trainer.state.output["loss"]))
    assert all(on and dtype == torch.bfloat16 for on, dtype in seen[True])
    assert not any(on for on, _ in seen[False]) and all(dtype == torch.float32 for _, dtype in seen[False])
