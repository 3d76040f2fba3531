"""The method: complexity-aware training with unit and block gates (Guenter & Sideris, arXiv 2411.09127).

A gated network (blocks.GatedNet) scales every internal channel and every residual branch by
xi ~ Bernoulli(theta), theta in [0, 1]. Weights W and thetas minimise

    C(W, theta) = E_xi[CE(f(x; W, xi), y)] + (wd / 2)||W||^2 + tau * [alpha F(theta)/F_0 + (1 - alpha) P(theta)/P_0]

with F, P the expected MACs and parameters (complexity), per-gate costs gamma_s = dR/dtheta_s weighted by
beta between blocks and units (objective), thetas moved by projected SGD on the trapezoid estimate of
dC/dtheta (gates, objective). A structure whose theta has settled in the domain of attraction of 0 is
removed physically (rules, surgery); one the deterministic network keeps with a clear margin is locked on.
The pruner drives it all from any training loop; arch turns a network into plain data and back.

Modules: gates, blocks, complexity, objective, rules, surgery, arch, bn, sync, config, pruner.
This package imports torch and nothing else of cap's (tests/test_layout.py checks it).
"""
