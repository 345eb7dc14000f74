"""Inference and evaluation with a trained adapter: nothing here trains.

* ``generate``: decoding options, left-padded batches, one answer's ids and text;
* ``prompts``: shard rows, dataset rows and benchmark records -> prompts (through ``qvl_data.encode``);
* ``predictions``: answer a stream of prompts and write the predictions file;
* ``files``: inputs must be regular files; outputs replace only what qvl wrote, complete or not at all;
* ``vqa``, ``metrics``: the VQA accuracy, instruction and caption metrics (pure functions);
* ``benchmarks``: the OK-VQA and COCO caption file readers;
* ``prediction_files``: predictions made elsewhere (official result formats, qvl's JSONL), for scoring;
* ``scores_file``: the score table and ``scores.json``;
* ``predict``, ``score``, ``export``: the ``qvl-train predict|score|export`` commands.
"""
