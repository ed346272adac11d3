"""Quality evaluation (`fitllm eval`)."""
