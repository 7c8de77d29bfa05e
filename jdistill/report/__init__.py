"""What a run shows a person: sample rollouts token by token (`samples`), the self-contained HTML
report (`html`, `python -m jdistill report RUN_DIR`) and the exported model's card (`card`)."""
