"""Speech (issue 18): a ProDiff-style teacher on espeak-ng speech and its progressive
distillation to 4, 2 and 1 steps, measured on held-out sentences.

Parts (each writes bench/out/speech_<part>.json; ``--table`` prints the markdown of all done):
- ``teacher``: ``fewstep train --config recipes/speech_teacher.json`` (reused when its run
  folder holds a model; ``SPEECH_TEACHER`` names another run);
- ``pd``: ``fewstep distill progressive`` of it from 8 steps down to 1 (rounds 4, 2, 1);
- ``eval``: ``--n`` held-out utterances (``speech:N:test``: sentences never trained on), each
  spoken with its real context (espeak-ng's durations, pitch and energy given, as ProDiff's
  validation does, so the frames align with the real spectrogram) by the teacher (DDIM =
  Euler at 4, 8 and 64 steps on the students' grid: uniform in the cosine VP process's
  time; 1 and 2 steps too, for what distillation buys) and by the students at 1, 2, 4 steps (their own grids). Per row: mel L1 and MCD
  (fewstep.metrics.audio) of the model's log-mel against the real one, the same after a
  Griffin-Lim round trip (the wav re-analysed), the real spectrogram's own Griffin-Lim
  round trip as the floor of the second pair, and the real-time factor on this CPU
  (seconds of computing per second of speech: the spectrogram alone, and with Griffin-Lim);
- ``wavs``: the first three held-out sentences from text (the model's own predicted durations, pitch
  and energy) by the 2-step student and the teacher at 64 steps, written as wav files into
  ``bench/out/speech_wavs/`` with their loudness and speech-band share.

    .venv/bin/python bench/speech.py --part teacher
    .venv/bin/python bench/speech.py --part pd
    .venv/bin/python bench/speech.py --part eval --n 24
    .venv/bin/python bench/speech.py --part wavs
    .venv/bin/python bench/speech.py --table
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import load_part, save_part  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
OUT = Path(os.environ.get("OUT", Path(__file__).resolve().parent / "out"))
RUNS = OUT / "speech_runs"
TEACHER = Path(os.environ.get("SPEECH_TEACHER", RUNS / "teacher"))
STUDENT = RUNS / "pd"
DOCS = ROOT / "docs" / "speech"


def _save(part: str, res: dict) -> None:
    save_part(OUT, f"speech_{part}", res)


def _load(part: str) -> dict:
    return load_part(OUT, f"speech_{part}")


def run_teacher(steps: int | None) -> dict:
    from fewstep.train.config import read_config_file
    from fewstep.train.teacher import train_teacher

    cfg = read_config_file(ROOT / "recipes" / "speech_teacher.json")
    if steps:
        cfg["steps"] = steps
    t = time.perf_counter()
    if not (TEACHER / "model.json").is_file():
        train_teacher(cfg, str(TEACHER), resume=(TEACHER / "checkpoints").is_dir(), progress=True)
    meta = json.loads((TEACHER / "model.json").read_text())
    ev = json.loads((TEACHER / "eval.json").read_text())
    return {"run": str(TEACHER), "steps": cfg["steps"], "batch_size": cfg["batch_size"], "data": cfg["data"],
            "train_seconds": meta.get("train_seconds"), "seconds_here": time.perf_counter() - t, "eval": ev,
            "params": None}


def run_pd(steps: int, batch: int) -> dict:
    from fewstep.methods import distill

    opts = {"teacher": str(TEACHER), "start_steps": 8, "end_steps": 1, "steps": steps, "batch_size": batch,
            "lr": 2e-4, "warmup": 100, "checkpoint_every": 200}
    t = time.perf_counter()
    if not (STUDENT / "model.json").is_file():
        distill("progressive", opts, out=str(STUDENT), progress=True,
                resume=(STUDENT / "config.json").is_file())
    meta = json.loads((STUDENT / "model.json").read_text())
    return {"run": str(STUDENT), "options": opts, "rounds": meta.get("rounds"),
            "seconds_here": time.perf_counter() - t}


def _gl_measures(mel: np.ndarray, real: np.ndarray, seed: int) -> tuple[float, float, float]:
    """(mel L1, MCD) of the Griffin-Lim wav of ``mel`` re-analysed, against ``real``, and the GL seconds."""
    from fewstep.data import speech
    from fewstep.metrics.audio import mel_cepstral_distortion, mel_l1

    t = time.perf_counter()
    wav = speech.mel_to_wav(mel, seed=seed)
    gl = time.perf_counter() - t
    again = speech.features(wav, pitch=False)["mel"][:len(real)]
    return mel_l1(again, real), mel_cepstral_distortion(again, real), gl


def run_eval(n: int) -> dict:
    import fewstep
    from fewstep.data import speech
    from fewstep.methods.progressive import level_grid
    from fewstep.metrics.audio import mel_cepstral_distortion, mel_l1
    from fewstep.tts import context_of, speak

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    utts = list(speech.load_speech(f"speech:{n}:test", seed=0))
    real = [u.mel for u in utts]
    audio_s = sum(u.seconds for u in utts)
    teacher = fewstep.load(str(TEACHER))
    grid_process = fewstep.process.make_process("vp_cosine")
    rows = []
    floor = [_gl_measures(r, r, i) for i, r in enumerate(real)]
    rows.append({"model": "real spectrogram, Griffin-Lim round trip (floor)", "nfe": 0, "mel_l1": 0.0, "mcd": 0.0,
                 "gl_mel_l1": float(np.mean([f[0] for f in floor])), "gl_mcd": float(np.mean([f[1] for f in floor])),
                 "rtf_mel": 0.0, "rtf_gl": sum(f[2] for f in floor) / audio_s})
    cases = [("teacher (DDIM)", teacher, k, level_grid(grid_process, k, teacher.sigma_max).float())
             for k in (1, 2, 4, 8, 64)]
    student = fewstep.load(str(STUDENT)) if (STUDENT / "model.json").is_file() else None
    if student is not None:
        cases += [("PD student", student.variant(k), k, None) for k in (4, 2, 1)]
    for name, model, k, grid in cases:
        ctx, _ = context_of(model, given=utts)
        t = time.perf_counter()
        out = []
        for b in range(0, len(utts), 8):  # batches of 8 utterances
            out += speak(model, ctx[b:b + 8], nfe=k, sampler="euler" if grid is not None else None, grid=grid,
                         seed=b, vocoder=False)
        mel_s = time.perf_counter() - t
        gl = [_gl_measures(o["mel"], r, i) for i, (o, r) in enumerate(zip(out, real))]
        rows.append({"model": name, "nfe": k,
                     "mel_l1": float(np.mean([mel_l1(o["mel"], r) for o, r in zip(out, real)])),
                     "mcd": float(np.mean([mel_cepstral_distortion(o["mel"], r) for o, r in zip(out, real)])),
                     "gl_mel_l1": float(np.mean([g[0] for g in gl])), "gl_mcd": float(np.mean([g[1] for g in gl])),
                     "rtf_mel": mel_s / audio_s, "rtf_gl": (mel_s + sum(g[2] for g in gl)) / audio_s})
        print(json.dumps(rows[-1]), flush=True)
        if (grid is not None and k in (2, 64)) or (grid is None and k in (1, 2)):
            from fewstep.plots import save_mels_png

            DOCS.mkdir(parents=True, exist_ok=True)
            save_mels_png({"real": real[:3], f"{name}, {k} NFE": [o["mel"] for o in out[:3]]},
                          DOCS / f"mels_{'teacher' if grid is not None else 'student'}_{k}.png", n=3)
    return {"utterances": len(utts), "audio_seconds": audio_s, "threads": torch.get_num_threads(), "rows": rows,
            "teacher": str(TEACHER), "student": str(STUDENT) if student is not None else None}


def run_wavs() -> dict:
    import fewstep
    from fewstep.metrics.audio import audio_summary
    from fewstep.tts import context_of, speak, write_wav

    folder = OUT / "speech_wavs"
    teacher, student = fewstep.load(str(TEACHER)), fewstep.load(str(STUDENT))
    out = []
    from fewstep.data.speech import test_sentences

    for i, text in enumerate(test_sentences()[:3]):  # held-out sentences: never trained on
        for tag, model, nfe in (("student2", student.variant(2), 2), ("teacher64", teacher, 64)):
            ctx, _ = context_of(model, [text], voice="en-us")
            t = time.perf_counter()
            spoken = speak(model, ctx, nfe=nfe, sampler=None if tag.startswith("student") else "euler", seed=i)[0]
            path = write_wav(folder / f"{i}_{tag}.wav", spoken["wav"])
            info = audio_summary(spoken["wav"], 22050)
            out.append({"text": text, "model": tag, "nfe": nfe, "file": str(path.relative_to(OUT)),
                        "seconds_to_make": time.perf_counter() - t, **info})
            print(json.dumps(out[-1]), flush=True)
    return {"wavs": out}


def table() -> str:
    ev, te, pd, wv = _load("eval"), _load("teacher"), _load("pd"), _load("wavs")
    lines = []
    if te:
        lines.append(f"Teacher: `{te['data']}`, {te['steps']} steps of batch {te['batch_size']}, "
                     f"{(te.get('train_seconds') or 0) / 60:.0f} min; its own check (8 held-out sentences, "
                     f"Euler {te['eval'].get('nfe')} steps): mel L1 {te['eval'].get('mel_l1', 0):.3f} vs "
                     f"{te['eval'].get('mel_l1_mean_frame', 0):.3f} for the mean frame.")
    if pd and pd.get("rounds"):
        lines.append("PD rounds: " + ", ".join(f"{r['student_steps']} steps ({r['cost'].get('seconds', 0) / 60:.0f} "
                                               f"min)" for r in pd["rounds"]) + f"; options `{pd['options']}`.")
    if ev:
        lines += ["", f"{ev['utterances']} held-out utterances ({ev['audio_seconds']:.0f} s of speech), "
                  f"{ev['threads']} CPU threads.", "",
                  "| model | NFE | mel L1 | MCD (dB) | mel L1 after GL | MCD after GL (dB) | RTF mel | RTF mel + GL |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in ev["rows"]:
            lines.append(f"| {r['model']} | {r['nfe'] or '-'} | {r['mel_l1']:.3f} | {r['mcd']:.2f} | "
                         f"{r['gl_mel_l1']:.3f} | {r['gl_mcd']:.2f} | {r['rtf_mel']:.3f} | {r['rtf_gl']:.3f} |")
    if wv:
        lines += ["", "| wav (bench/out/) | text | NFE | seconds | rms dBFS | share 80-4000 Hz |", "|---|---|---|---|---|---|"]
        for w in wv["wavs"]:
            lines.append(f"| `{w['file']}` | {w['text']} | {w['nfe']} | {w['seconds']:.2f} | {w['rms_db']:.1f} | "
                         f"{w['speech_band']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--part", choices=("teacher", "pd", "eval", "wavs"))
    ap.add_argument("--teacher-steps", type=int)
    ap.add_argument("--pd-steps", type=int, default=800)
    ap.add_argument("--pd-batch", type=int, default=16)
    ap.add_argument("--n", type=int, default=24)
    ap.add_argument("--table", action="store_true")
    a = ap.parse_args()
    if a.part == "teacher":
        _save("teacher", run_teacher(a.teacher_steps))
    elif a.part == "pd":
        _save("pd", run_pd(a.pd_steps, a.pd_batch))
    elif a.part == "eval":
        _save("eval", run_eval(a.n))
    elif a.part == "wavs":
        _save("wavs", run_wavs())
    if a.table:
        print(table())


if __name__ == "__main__":
    main()
