"""A1111 runs this before parsing its command line: the extension's own option."""


def preload(parser):
    parser.add_argument(
        "--copier-lora-dir",
        type=str,
        default=None,
        help="Copier LoRA: folder for the LoRAs it writes, inside the WebUI's LoRA folders (default: its --lora-dir)",
    )
