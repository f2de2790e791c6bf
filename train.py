"""qforge: compose -> validate -> plan -> launch.  `python train.py quant=bnb4 strategy=fsdp`"""

import hydra
from omegaconf import DictConfig

from trainer.compose import register

register()


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> None:
    from trainer.entry import run_entry

    run_entry(cfg)


if __name__ == "__main__":
    main()
