"""Scenario files: a whole simulated federation in one TOML file.

A scenario names the task and its data, the sites (one by one or in groups with
``count``), each site's data partition, compute speed, links, reliability,
privacy limits and behaviour, and the run. ``fedvault simulate SCENARIO.toml``
runs it with the very same ServerApp and ClientApp as a real deployment.

::

    name = "hospitals"
    description = "10 hospitals, two on slow links"

    [data]                       # the data the sites hold between them
    task = "digits"              # built-in task (fedvault tasks)
    partition = "dirichlet"      # default partition of every site: iid | dirichlet
    alpha = 0.5                  # Dirichlet concentration (smaller = more label skew)
    quantity-skew = 0.0          # sigma of log-normal site sizes (0 = equal sizes)
    # data-path = "table.csv"    # a table to split instead of the task's embedded data
    # generate = { rows = 60000, features = 20, classes = 10 }   # or a generated table

    [run]                        # any run-config key (see pyproject.toml; the defaults are
                                 # its defaults: he = false, dp = true), e.g.
    num-server-rounds = 5
    fraction-train = 1.0         # or sites-per-round = N
    min-sites = 3
    dp = true
    he = true
    round-timeout = 600.0        # *simulated* seconds the server waits for replies

    [defaults]                   # every site, unless its group says otherwise
    compute = 2000.0             # examples processed per second
    uplink-mbps = 100.0
    downlink-mbps = 100.0
    latency-ms = 20.0
    dropout = 0.0                # probability of dropping out in a round (when online)
    dropout-mode = "before-training"   # or "mid-upload" (trains, spends epsilon, upload lost)
    availability = 1.0           # probability of being online when a round starts
    max-epsilon = 10.0           # the site's own privacy budget (its node config)
    delta = 1e-5

    [[sites]]                    # a group of sites
    group = "rural"
    count = 2
    uplink-mbps = 10.0
    [[sites]]
    group = "attacker"
    behaviour = "sign-flip"      # honest | label-flip | sign-flip | scale |
    attack-start = 3             # model-replacement | backdoor | free-rider, or a
    attack-rounds = 0            # hostile reply (simulations.hostile); 0 = to the end

Sites are numbered ``site-0 … site-(N-1)`` in file order; site ``K`` holds data
partition ``K`` and, with encryption, federation key ``site-K``. Every error
names the table and key at fault.
"""

from simulations.scenario.parse import (
    informative_features,
    parse_scenario,
)
from simulations.scenario.spec import (
    BEHAVIOURS,
    DROPOUT_MODES,
    HE_ONLY,
    MAX_SITES,
    PARTITIONS,
    Behaviour,
    DataSpec,
    DropoutMode,
    Scenario,
    SiteProfile,
    check_run_keys,
)
from simulations.scenario.store import (
    builtin_path,
    builtin_scenarios,
    load_compiled,
    load_scenario,
    save_compiled,
)

__all__ = [
    "BEHAVIOURS",
    "DROPOUT_MODES",
    "HE_ONLY",
    "MAX_SITES",
    "PARTITIONS",
    "Behaviour",
    "DataSpec",
    "DropoutMode",
    "Scenario",
    "SiteProfile",
    "builtin_path",
    "builtin_scenarios",
    "check_run_keys",
    "informative_features",
    "load_compiled",
    "load_scenario",
    "parse_scenario",
    "save_compiled",
]
