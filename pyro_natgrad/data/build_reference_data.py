"""Rebuild ``pyro_natgrad/data/`` from the raw reference files.

Usage::

    python pyro_natgrad/data/build_reference_data.py /path/to/shared/reference

The raw directory holds ``posteriordb/*.json`` and ``inference_gym/*.json``
(posteriordb reference posteriors and inference-gym ground truths gathered
with their provenance). This script only *reorganises* them: summary
statistics become lists in ``param_names`` order, data not used by the model is
dropped, and the provenance fields are kept verbatim. No number is recomputed.
"""

import gzip
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT = os.path.join(ROOT, "pyro_natgrad", "data")

# name -> (kind, gaussian_like, data keys the model needs)
POSTERIORDB = {
    "arK-arK": ("time-series", True, ["K", "T", "y"]),
    "diamonds-diamonds": ("linear", True, None),  # data in a separate file
    "earnings-logearn_interaction_z": ("linear", True, ["N", "earn", "height", "male"]),
    "eight_schools-eight_schools_noncentered": ("hierarchical", False, ["J", "y", "sigma"]),
    "gp_pois_regr-gp_pois_regr": ("poisson", False, ["N", "x", "k"]),
    "kidiq-kidscore_momhsiq": ("linear", True, ["N", "kid_score", "mom_hs", "mom_iq"]),
    "kilpisjarvi_mod-kilpisjarvi": (
        "linear", True, ["N", "x", "y", "pmualpha", "psalpha", "pmubeta", "psbeta"]),
    "mesquite-logmesquite_logvash": (
        "linear", True,
        ["N", "weight", "diam1", "diam2", "canopy_height", "total_height", "group"]),
    "nes2000-nes": (
        "linear", True,
        ["N", "partyid7", "real_ideo", "race_adj", "age_discrete", "educ1", "gender", "income"]),
    "sblrc-blr": ("linear", True, ["N", "D", "X", "y"]),
    "sblri-blr": ("linear", True, ["N", "D", "X", "y"]),
}

PDB_PROVENANCE_KEYS = [
    "model_name", "data_name", "keywords", "source_repo", "source_commit", "source_paths",
    "inference", "n_draws", "n_chains", "checks_made", "max_abs_diff_vs_pdb_mean_value",
]


def _ordered(stat, names):
    if set(stat) != set(names):
        raise ValueError("statistic keys differ from param_names")
    return [stat[n] for n in names]


def _dump(obj, fname):
    path = os.path.join(OUT, fname)
    with open(path, "w") as f:
        json.dump(obj, f, separators=(",", ":"))
        f.write("\n")
    return path


def build_posteriordb(raw):
    for name, (kind, gaussian_like, keys) in POSTERIORDB.items():
        with open(os.path.join(raw, "posteriordb", name + ".json")) as f:
            src = json.load(f)
        assert src["name"] == name
        names = src["param_names"]
        out = {
            "name": name,
            "source": "posteriordb",
            "description": src["model"],
            "kind": kind,
            "gaussian_like": gaussian_like,
            "param_names": names,
            "mean": _ordered(src["ref_mean"], names),
            "sd": _ordered(src["ref_sd"], names),
            "mean_se": _ordered(src["ref_mcse_mean"], names),
            "cov": src["ref_cov"],
            "quantiles": {q: _ordered(v, names) for q, v in src["ref_quantiles"].items()},
            "provenance": {k: src[k] for k in PDB_PROVENANCE_KEYS if k in src},
        }
        if src.get("semianalytic"):
            sa = src["semianalytic"]
            out["semianalytic"] = {
                "method": sa["method"],
                "mean": _ordered(sa["mean"], names),
                "sd": _ordered(sa["sd"], names),
                "beta_cov": sa["beta_cov"],
                "max_abs_mean_diff_over_mcse": sa["max_abs_mean_diff_over_mcse"],
                "max_rel_sd_diff": sa["max_rel_sd_diff"],
            }
        if keys is None:
            with gzip.open(os.path.join(raw, "posteriordb", src["data_file"])) as f:
                data = json.load(f)
            data = {k: data[k] for k in ("N", "K", "X", "Y")}
            data_file = "diamonds.data.json.gz"
            payload = json.dumps(data, separators=(",", ":")).encode()
            with open(os.path.join(OUT, data_file), "wb") as raw_f:
                with gzip.GzipFile(fileobj=raw_f, mode="wb", compresslevel=9, mtime=0,
                                   filename="") as gz:
                    gz.write(payload)
            out["data_file"] = data_file
            out["provenance"]["original_data_file"] = src["data_file"]
        else:
            out["data"] = {k: src["data"][k] for k in keys}
        _dump(out, name + ".json")


def _gym_stats(gt, stem):
    return gt[stem + "_MEAN"], gt[stem + "_STANDARD_DEVIATION"], gt[stem + "_MEAN_STANDARD_ERROR"]


def build_inference_gym(raw):
    gym = os.path.join(raw, "inference_gym")

    # German credit: one shared data file, two references.
    with open(os.path.join(gym, "german_credit_numeric_logistic_regression.json")) as f:
        logi = json.load(f)
    _dump({
        "name": "german_credit_numeric",
        "rows_24_features_then_class": logi["data"]["raw_rows_24_features_then_class"],
        "note": logi["data"]["note"],
        "data_source": logi["data_source"],
    }, "german_credit_numeric.data.json")
    wnames = ["w[%d]" % (i + 1) for i in range(25)]
    check = logi["check"]["label=1 for orig class 2 (bad)"]
    _dump({
        "name": "german_credit_numeric_logistic_regression",
        "source": "inference_gym",
        "description": logi["model"],
        "kind": "logistic",
        "gaussian_like": True,
        "param_names": wnames,
        "mean": logi["gt_mean"],
        "sd": logi["gt_sd"],
        "mean_se": logi["gt_mean_se"],
        "data_file": "german_credit_numeric.data.json",
        "provenance": {
            "source_name": logi["name"],
            "ground_truth_source": logi["ground_truth_source"],
            "data_source": logi["data_source"],
        },
        "check": {
            "note": "independent importance-sampling check and Laplace fit recorded in the source "
                    "file, for label y = (class == 2)",
            **{k: check[k] for k in ("is_ess", "mean", "sd", "laplace_mode", "laplace_sd")},
        },
    }, "german_credit_numeric_logistic_regression.json")

    with open(os.path.join(gym, "german_credit_numeric_probit_regression.json")) as f:
        prob = json.load(f)
    mean, sd, se = _gym_stats(prob["ground_truth"], "IDENTITY")
    _dump({
        "name": "german_credit_numeric_probit_regression",
        "source": "inference_gym",
        "description": prob["model"] + " [logistic file: " + logi["model"] + "]",
        "kind": "probit",
        "gaussian_like": True,
        "param_names": wnames,
        "mean": mean,
        "sd": sd,
        "mean_se": se,
        "data_file": "german_credit_numeric.data.json",
        "provenance": {
            "source_name": prob["name"],
            "ground_truth_source": "not stated in the source file (by analogy with the logistic "
                                   "file: inference-gym 0.0.5 wheel, inference_gym/targets/"
                                   "ground_truth/german_credit_numeric_probit_regression.py)",
            "data_source": logi["data_source"],
        },
        "check": {
            "note": "independent importance-sampling check recorded in the source file",
            **{k: prob["check"][k] for k in ("is_ess", "mean", "sd")},
        },
    }, "german_credit_numeric_probit_regression.json")

    with open(os.path.join(gym, "eight_schools.json")) as f:
        es = json.load(f)
    gt = es["ground_truth"]
    names, mean, sd, se = [], [], [], []
    for stem, site in [("IDENTITY_AVG_EFFECT", "avg_effect"),
                       ("IDENTITY_LOG_STDDEV", "log_stddev"),
                       ("IDENTITY_SCHOOL_EFFECTS", "school_effects")]:
        m, s, e = _gym_stats(gt, stem)
        if isinstance(m, list):
            names += ["%s[%d]" % (site, i + 1) for i in range(len(m))]
            mean += m
            sd += s
            se += e
        else:
            names.append(site)
            mean.append(m)
            sd.append(s)
            se.append(e)
    _dump({
        "name": "eight_schools",
        "source": "inference_gym",
        "description": es["model"],
        "kind": "hierarchical",
        "gaussian_like": False,
        "param_names": names,
        "mean": mean,
        "sd": sd,
        "mean_se": se,
        "data": es["data"],
        "provenance": {"source_name": es["name"], "ground_truth_source": es["source"]},
    }, "eight_schools.json")

    with open(os.path.join(gym, "radon_contextual_effects_minnesota.json")) as f:
        radon = json.load(f)
    _dump({"name": "radon_minnesota", "data_recipe": radon["data_recipe"], **radon["data"]},
          "radon_minnesota.data.json")
    order = [("county_effect_mean", False), ("county_effect_scale", False),
             ("county_effect", True), ("weight", True), ("log_radon_scale", False)]
    for variant, suffix, scale_prior in [("uniform", "", "Uniform(0, 100)"),
                                         ("halfnormal", "_halfnormal", "HalfNormal(1)")]:
        comp = radon["comparison"][variant]
        names = []
        stats = {k: [] for k in ("gt_mean", "gt_sd", "gt_mean_se", "quad_mean", "quad_sd")}
        for site, is_vec in order:
            n = len(comp[site]["gt_mean"])
            names += ["%s[%d]" % (site, i + 1) for i in range(n)] if is_vec else [site]
            for k in stats:
                stats[k] += comp[site][k]
        _dump({
            "name": "radon_contextual_effects_minnesota" + suffix,
            "source": "inference_gym",
            "description": radon["model"] + " -- this reference: both scale priors "
                           + scale_prior + ".",
            "kind": "hierarchical",
            "gaussian_like": False,
            "param_names": names,
            "mean": stats["gt_mean"],
            "sd": stats["gt_sd"],
            "mean_se": stats["gt_mean_se"],
            "data_file": "radon_minnesota.data.json",
            "provenance": {
                "source_name": radon["name"],
                "ground_truth_source": radon["ground_truth_source"],
                "data_recipe": radon["data_recipe"],
            },
            "check": {
                "note": "quad_mean / quad_sd from the source file's 'comparison' block (an "
                        "independent cross-check; method not stated there)",
                "mean": stats["quad_mean"],
                "sd": stats["quad_sd"],
            },
        }, "radon_contextual_effects_minnesota%s.json" % suffix)


if __name__ == "__main__":
    raw_dir = sys.argv[1] if len(sys.argv) > 1 else "/work/shared/reference"
    os.makedirs(OUT, exist_ok=True)
    build_posteriordb(raw_dir)
    build_inference_gym(raw_dir)
