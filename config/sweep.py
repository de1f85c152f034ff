# The results sweep (experiments/run.py): every run is `python train.py config/sweep.py` plus its flags.
# It is the default model (8 layers, d=192, FFN 512, vocab 4096: 4.0M parameters, 3.2M of them the
# body), trained for 1,000 steps of 1,024 tokens = 1.02M tokens instead of the main job's 1,500, so
# that three seeds of every recipe fit in an afternoon on 2 cores.
max_iters = 1000
warmup_iters = 100
eval_interval = 100
eval_iters = 12
final_eval_iters = 40  # 41k validation tokens, the same windows for every run
log_interval = 10  # the training loss every 10 steps, for the spike at the switch
