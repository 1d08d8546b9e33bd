"""
Continuations of a prompt by a trained maml-gpt model (the checkpoint in --out_dir).

    python sample.py "The main industry of"                          # 3 samples from out/demo/ckpt.pt
    python sample.py --out_dir out/large --temperature 0 "The"       # greedy, from another run
    python sample.py "<|endoftext|>"                                 # unconditional samples
"""
import argparse
import os

import maml_gpt as mg


def main(argv=None):
    p = argparse.ArgumentParser(description="Continuations of PROMPT by the model in --out_dir.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("prompt", help="text to continue ('<|endoftext|>' for unconditional samples)")
    p.add_argument("--out_dir", default=os.path.join("out", "demo"), help="the run folder holding ckpt.pt")
    p.add_argument("--num_samples", type=int, default=3, help="continuations to print")
    p.add_argument("--max_new_tokens", type=int, default=100,
                   help="tokens per continuation, unless <|endoftext|> comes first")
    p.add_argument("--temperature", type=float, default=0.8, help="softmax temperature (0 = greedy)")
    p.add_argument("--top_k", type=int, default=200, help="sample among the k most likely tokens (0 = all)")
    p.add_argument("--seed", type=int, default=1337, help="the samples are a function of it")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    args = p.parse_args(argv)  # None: sys.argv[1:]

    def body():
        if args.num_samples < 1 or args.max_new_tokens < 1:
            raise mg.UserError("--num_samples and --max_new_tokens must be >= 1")
        if args.temperature < 0 or args.top_k < 0:
            raise mg.UserError(f"--temperature and --top_k must be >= 0 "
                               f"(got {args.temperature}, {args.top_k})")
        device = mg.pick_device(args.device)
        path = os.path.join(args.out_dir, "ckpt.pt")
        ck = mg.load_checkpoint(path, device)
        model = mg.model_from_checkpoint(ck, device).eval()
        texts = mg.complete(model, args.prompt, args.num_samples, args.max_new_tokens, args.temperature,
                            args.top_k, args.seed)
        print(f"{path} (step {ck['step']}), temperature {args.temperature}, top_k {args.top_k}, "
              f"seed {args.seed}")
        for i, text in enumerate(texts, 1):
            print(f"--- sample {i}/{len(texts)}\n{args.prompt}{text}")
    mg.cli(body)


if __name__ == "__main__":
    main()
