# One-command setup and checks. `make test` is what CI runs (.ci/run); `make demo` is the
# whole method end to end on the bundled demo dataset, offline, on the CPU.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export TF_CPP_MIN_LOG_LEVEL ?= 2
export PYTHONUNBUFFERED := 1

.PHONY: venv test test-quick lint demo demo-clean clean serve paper-smoke

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade --quiet pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

venv: $(VENV)/.installed

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/hadolint Dockerfile

# Two pytest workers (the tests are mostly single-threaded Python and TF start-up on 2 cores);
# how they share the work: tests/_groups.py.
test: lint
	$(PY) -m pytest -n 2

# The inner loop: everything but the tests marked slow (real training runs, XLA compilation,
# the miniatures, LiteRT conversions, the paper preset's IRv2, servers of their own: any test
# that took 5 s or more); CI runs them all.
test-quick: venv
	$(PY) -m pytest -n 2 -m "not slow"

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

# ---------------------------------------------------------------------------------------------
# make demo: demo data -> TFRecords -> stages 1, 2, 3 (tiny preset) -> reports, Grad-CAM.
# Every step leaves a file behind, so a rerun skips what is done; `make demo-clean` starts over.
# The variables can be overridden (tests/test_end_to_end.py runs a miniature of this recipe).
DEMO_DATA ?= data/demo
DEMO ?= runs/demo
DEMO_GEN ?=
DEMO_SIZES ?= 224,448,720
DEMO_TRAIN ?= --preset tiny --seed 0 --deterministic
# BatchNorm momentum: 0.9 for stages of ~100 and 12 steps, 0.7 for stage 3's 16 steps, whose
# new cells' moving averages would otherwise keep 19 % of their initial values (0.9^16).
DEMO_STAGE1 ?= --weights none --epochs 8 --batch-size 16 --bn-momentum 0.9
DEMO_STAGE2 ?= --epochs 1 --batch-size 16 --bn-momentum 0.9
DEMO_STAGE3 ?= --epochs 2 --batch-size 8 --steps-per-epoch 8 --validation-freq 2 --bn-momentum 0.7
DEMO_EVAL ?=
DEMO_MIN_KAPPA ?= 0.6
TRAIN_DEMO = $(PY) train.py --data $(DEMO_DATA)/records --model-dir $(DEMO)/models $(DEMO_TRAIN)
# $(call timed,STEP,COMMAND): run COMMAND and record its wall time (ms) in $(DEMO)/times/STEP.
timed = echo "$(strip $(2))" && mkdir -p $(DEMO)/times && s=$$(date +%s%N) && $(2) && \
	echo "$(1) $$(( ($$(date +%s%N) - s) / 1000000 ))" > $(DEMO)/times/$(1)
DEMO_STEPS = data records stage1 stage2 stage3 evaluate1 evaluate2 evaluate3 gradcam

demo: $(DEMO)/summary.txt

$(DEMO_DATA)/raw/retinopathy_solution.csv: | venv
	@echo "== [1/6] demo dataset (data_prep.demo)"
	@$(call timed,data,$(PY) -m data_prep.demo --out $(DEMO_DATA)/raw $(DEMO_GEN))

$(DEMO_DATA)/records/manifest.json: $(DEMO_DATA)/raw/retinopathy_solution.csv
	@echo "== [2/6] TFRecords at $(DEMO_SIZES) (data_prep.kaggle)"
	@$(call timed,records,$(PY) -m data_prep.kaggle --kaggle-dir $(DEMO_DATA)/raw \
		--out $(DEMO_DATA)/records --sizes $(DEMO_SIZES))

$(DEMO)/stage1.done: $(DEMO_DATA)/records/manifest.json
	@echo "== [3/6] stage 1: BaseNet + Multi-Task heads"
	@$(call timed,stage1,$(TRAIN_DEMO) --stage 1 $(DEMO_STAGE1))
	touch $@

$(DEMO)/stage2.done: $(DEMO)/stage1.done
	@echo "== [3/6] stage 2: + medium cells, from stage 1"
	@$(call timed,stage2,$(TRAIN_DEMO) --stage 2 $(DEMO_STAGE2))
	touch $@

$(DEMO)/stage3.done: $(DEMO)/stage2.done
	@echo "== [3/6] stage 3: + large cells, from stage 2"
	@$(call timed,stage3,$(TRAIN_DEMO) --stage 3 $(DEMO_STAGE3))
	touch $@

$(DEMO)/reports/stage%/report.json: $(DEMO)/stage%.done
	@echo "== [4/6] evaluate stage $* on the demo test split"
	@$(call timed,evaluate$*,$(PY) evaluate.py --model-dir $(DEMO)/models --stage $* \
		--data $(DEMO_DATA)/records --split test --out $(DEMO)/reports/stage$* $(DEMO_EVAL))

$(DEMO)/gradcam/.done: $(DEMO)/stage3.done
	@echo "== [5/6] Grad-CAM on a few demo test images (predict.py)"
	@$(call timed,gradcam,$(PY) predict.py --model-dir $(DEMO)/models --stage 3 \
		--out $(DEMO)/gradcam/predictions.csv --gradcam $(DEMO)/gradcam \
		$(wordlist 1,6,$(sort $(wildcard $(DEMO_DATA)/raw/test/*.jpeg))))
	touch $@

$(DEMO)/summary.txt: $(foreach s,1 2 3,$(DEMO)/reports/stage$(s)/report.json) $(DEMO)/gradcam/.done
	@echo "== [6/6] summary: kappa on the demo test split (Table II layout)"
	$(PY) evaluate.py --min-kappa $(DEMO_MIN_KAPPA) --compare $(DEMO)/reports/stage1 \
		$(DEMO)/reports/stage2 $(DEMO)/reports/stage3 > $@.tmp || { cat $@.tmp; exit 1; }
	@echo "wall time per step (recorded when the step ran; a rerun skips finished steps):" >> $@.tmp
	@for s in $(DEMO_STEPS); do cat $(DEMO)/times/$$s 2>/dev/null || echo "$$s -"; done | awk \
		'$$2 == "-" { printf "  %-10s  (made by an earlier run)\n", $$1; next } \
		{ printf "  %-10s %7.1f s\n", $$1, $$2 / 1000; t += $$2 } \
		END { printf "  %-10s %7.1f s (%.1f min)\n", "total", t / 1000, t / 60000 }' >> $@.tmp
	cat $@.tmp && mv $@.tmp $@
	@echo "everything is in $(DEMO)/: reports/, gradcam/, models/ (TensorBoard logs in models/stage*/)"

demo-clean:
	rm -rf $(DEMO) $(DEMO_DATA)

# make paper-smoke (not in make test, ~20 min): the paper preset's M²CNN chain 224 -> 448 -> 720
# for 2 steps per stage on the demo data: seconds per step, peak RSS, checkpoint size, and the
# real train step's memory per image (docs/reproduce.md).
# PAPER_SMOKE_FLAGS: more flags (tests/test_end_to_end.py: a tiny preset at small sizes).
PAPER_SMOKE_FLAGS ?=
paper-smoke: $(DEMO_DATA)/records/manifest.json
	$(PY) benchmarks/paper_smoke.py --data $(DEMO_DATA)/records --out $(DEMO)/paper-smoke \
		$(PAPER_SMOKE_FLAGS)

# make serve: the grader page and API (serve.py) on the stage-3 demo model, at
# http://127.0.0.1:8000/; the demo recipe builds the model first if it is missing.
SERVE_FLAGS ?=
serve: $(DEMO)/stage3.done
	$(PY) serve.py --model-dir $(DEMO)/models --stage 3 $(SERVE_FLAGS)
