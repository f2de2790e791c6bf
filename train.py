"""qforge: compose -> validate -> plan -> launch.  `python train.py quant=bnb4 strategy=fsdp`"""

from trainer.cli import main

if __name__ == "__main__":
    main()
