"""`python -m cinemo_rt.train --config configs/demo.json [--key value ...]` (or under torchrun)."""

from __future__ import annotations

import argparse
import logging
import sys

from ..interrupts import exit_code_for, terminate_as_interrupt
from .config import TrainConfig
from .loop import train


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cinemo_rt.train",
        description="Train Cinemo (paper Algorithm 1). Any config field can be overridden with --field value "
                    "(JSON values; --unet.layers_per_block 2 sets one nested key). Multi-GPU / multi-node: "
                    "torchrun --nproc_per_node N -m cinemo_rt.train ...")
    parser.add_argument("--config", help="JSON file with TrainConfig fields (e.g. configs/demo.json)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda:LOCAL_RANK if available, else cpu)")
    args, overrides = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stdout)
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    logging.getLogger("cinemo_rt.video").setLevel(logging.WARNING)  # one line per written clip otherwise
    try:
        cfg = TrainConfig.from_file(args.config, overrides)
    except (ValueError, OSError) as err:
        parser.error(str(err))
    log = logging.getLogger(__name__)
    with terminate_as_interrupt():  # SIGTERM (a cluster's stop) cleans up like Ctrl-C
        try:
            result = train(cfg, device=args.device)
        except ValueError as err:  # refused resumes, bad data, checkpoints, export folders
            log.error("%s", err)
            return 2
        except KeyboardInterrupt as interrupt:
            log.error("interrupted; the last complete checkpoint is kept (resume with --resume auto)")
            return exit_code_for(interrupt)
    log.info("done: %d steps, final loss %.4f, %.0f s", result["step"], result["loss"], result["seconds"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
