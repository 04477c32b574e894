"""`python -m inference [--host H] [--port P]`: the inference server with settings from `FTJOBS_*`."""

import argparse

from inference.app import serve
from models.settings import get_settings

parser = argparse.ArgumentParser(prog="python -m inference")
parser.add_argument("--host", default=None, help="default: the host of FTJOBS_INFERENCE_URL")
parser.add_argument("--port", type=int, default=None, help="default: the port of FTJOBS_INFERENCE_URL")
args = parser.parse_args()
serve(get_settings(), args.host, args.port)
