# The small configuration of the results sweep (experiments.py quality): every row of the quality
# tables is `python train.py config/sweep.py` plus that row's flags. 7.2M parameters (6.4M of them
# the tied 50k embedding), 1,024 tokens per step, 300 steps = 307k tokens: ~2 min on 2 CPU cores.
# It keeps the previous setup, with which the README's Results were measured: GPT-2's full vocabulary,
# weight decay 0.1, eager training.
vocab = 50257
weight_decay = 0.1
compile = False
n_layer = 4
n_head = 4
n_kv_head = 2
n_embd = 128
block_size = 64
batch_size = 16
max_iters = 300
lr = 2e-3
min_lr = 2e-4
warmup_iters = 20
eval_interval = 30
eval_iters = 4
final_eval_iters = 60  # 61k validation tokens, the same windows for every run
log_interval = 1  # every step's training loss, for the spike at the switch
