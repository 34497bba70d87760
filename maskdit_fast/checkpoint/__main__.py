"""`python -m maskdit_fast.checkpoint CHECKPOINT OUTPUT`: the EMA weights of a checkpoint (sharded
folder or .pt, written at any world size) as one safetensors file, with the model metadata that
`maskdit_fast.sample` needs to rebuild the network. One process, no GPU needed."""
import argparse
import json

from maskdit_fast.checkpoint.files import export_safetensors
from maskdit_fast.checkpoint.loading import load_ema_state


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m maskdit_fast.checkpoint",
                                     description="Export a checkpoint's EMA weights as one safetensors file.")
    parser.add_argument("checkpoint", help="a step_XXXXXXXX directory (DCP) or step_XXXXXXXX.pt file")
    parser.add_argument("output", help="the .safetensors file to write")
    args = parser.parse_args(argv)
    ema, meta = load_ema_state(args.checkpoint)
    export_safetensors(ema, args.output, metadata={"maskdit_fast": json.dumps(meta)} if meta else None)
    print(f"{len(ema)} EMA tensors ({sum(t.numel() for t in ema.values()) / 1e6:.2f}M values) -> {args.output}")


if __name__ == "__main__":
    main()
