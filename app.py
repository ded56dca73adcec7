"""Serve the mmdemo Gradio app (also the Hugging Face Space entry point).

    python app.py                      # default checkpoints (MMDEMO_*_MODEL or the Hub defaults)
    python app.py --tiny-models        # tiny random checkpoints: no download, meaningless outputs
    GRADIO_SERVER_PORT=8080 python app.py --caption-model ./my-blip
"""

from mmdemo.ui.app import main

if __name__ == "__main__":
    main()
