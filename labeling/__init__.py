"""Labeling: the label store, the annotators' Gradio app, pair expansion, export and statistics."""
