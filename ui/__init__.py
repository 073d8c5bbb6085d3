"""The seal-diffusion web app (Gradio): ``from ui.app import build_app, launch``."""
