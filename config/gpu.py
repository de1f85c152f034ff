# A GPU-sized run (49M parameters, 26M of them the tied embedding, 8k tokens per step; bf16 autocast and torch.compile come on with CUDA):
#   python train.py config/gpu.py
#   torchrun --standalone --nproc_per_node=8 train.py config/gpu.py --grad_accum=1
# Shakespeare holds only 1.4M training tokens: 3000 steps of 8k tokens is ~17 passes, so dropout is on.
# With more text (--data=PATH), raise max_iters and drop dropout.
out_dir = "out-gpu"
vocab = 50257  # GPT-2's full BPE: at this width the embedding no longer dominates
n_layer = 8
n_head = 8
n_kv_head = 4
n_embd = 512
block_size = 256
batch_size = 32
max_iters = 3000
lr = 1e-3
min_lr = 1e-4
warmup_iters = 100
dropout = 0.1
eval_interval = 250
eval_iters = 40
final_eval_iters = 200
