"""Export of binllm directories to other runtimes' formats (`binllm export`)."""
