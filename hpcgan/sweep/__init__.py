"""Studies: a grid of stage tasks, one run directory each, submitted at once as Slurm job arrays that wait on
each other (submitit, `afterok`), or run here one after another (executor=local). Resumable and observable.

    python tools/sweep.py study=tiny out=studies/tiny [executor=auto|slurm|local] [gan.steps=8 ...]
    python tools/sweep.py status out=studies/tiny [--watch]

A study (configs/study/<name>.yaml; the cluster it runs on: configs/cluster/<name>.yaml) expands into tasks,
stage by stage (STAGES), each a command of the project's own entry points:
  simulate  tools/simulate.py          the embedded simulator (only when no shards and no sources are given)
  shard     tools/shard.py             the sources at every image size of the grid
  features  tools/train_features.py    the cell extractor of each shard set, once (every evaluation uses it)
  train     hpcgan.train               models x seeds x sizes (torchrun for ranks > 1, rendezvous over nodes)
  generate  tools/generate.py          a balanced synthetic set of each GAN in generate.models
  evaluate  hpcgan.evaluate            every GAN run, one shared feature cache per study
  classify  tools/classify.py          architectures x regimes x seeds (x the synthetic sets, for the regimes
                                       that use one) at every size; with classify.rival_search also the search:
                                       every cheap recipe, one seed, scored on val (hpcgan.classify.rival)
  rival     tools/classify.py          the search's winner (recipe_from=) with every seed on test (`rival`), on
                                       the uncut split (`full`) and under synthetic data (`on_rival`)
Run directories are named by their grid values (gan/wgan_gp_ac-s0-32, synthetic/..., cls/small_cnn-original-s0-32),
so the same study in the same folder always means the same tasks.

On Slurm each stage is one job array (`%N` = resources.<stage>.array_parallelism) whose dependency is `afterok`
on exactly the upstream tasks it needs (their array tasks, or whole arrays), so the whole study is submitted at
once; with `kill_on_invalid_dep` a task whose upstream failed is cancelled instead of pending forever. Before
anything is submitted every stage's request goes through `sbatch --test-only`: a request the partition cannot
meet fails there, naming the stage and sbatch's reason. A task (TaskRunner, a submitit Checkpointable) runs its
command in a subprocess; at the time-limit warning (USR2, cluster.signal_delay_s before the end) or a
preemption, the training saves a checkpoint (hpcgan.train handles USR2/TERM) and the task requeues itself and
resumes from its run directory.

Re-running the launch skips finished tasks (finished() reads the task's own outputs: status.json finished and
results present), leaves running, pending and requeued ones alone (and makes new tasks wait on them), and
submits the failed and missing ones. One run directory never runs twice at once: a task holds
tasks/<name>/lock (host, pid, job id) while it runs; a holder whose process or job is gone is taken over.

Study directory:
  study.json               the settings and every task: stage, command, output, dependencies, resources
  submissions.jsonl        one row per submitted array: stage, job id, its tasks in array order, dependency
  tasks/<task>/state.json  the runner's record: state, attempt, job id, host, pid, times, exit code, error
  tasks/<task>/lock        held while the task runs
  tasks/<task>/output.log  the command's stdout and stderr, every attempt
  submitit/                submitit's job scripts, pickles and logs
  data/ gan/ synthetic/ cls/ cache/   shards, run directories, synthetic sets, the evaluation's cell extractor
                                      and real-feature cache
`status` reads only these files (so it works without Slurm accounting) and adds Slurm's view (squeue, sacct)
when it can.

The package, a module per job (each imports only those above it):
  settings  the study schema (StudySettings, one home for its defaults), its checks
  compose   load_study: configs/study/<name>.yaml + overrides -> StudySettings
  expand    StudySettings -> tasks (pure)
  queue     Slurm's view: squeue, sacct
  tasks     the study directory: study.json, submissions.jsonl, per-task state and lock, finished()
  run       one task: its command, the lock, signals, requeue (TaskRunner)
  slurm     a study as job arrays: executors, preflight, dependencies, submission
  status    the status table, watch
  launch    write study.json, then submit (slurm) or run here (local)

    configs/study/<name>.yaml ──load_study──> StudySettings ──expand──> [Task ...] ──write_study──> study.json
        ──launch──> slurm: one array per stage (afterok / aftercorr on the upstream tasks)   | local: in order
        ──> each task: TaskRunner -> run_task -> the stage's command, in its run directory, under tasks/<name>/lock
        ──> status: tasks/<name>/state.json + the run directories' own markers (+ squeue / sacct)
"""
from hpcgan.sweep.compose import REPLACED_KEYS, load_study  # noqa: F401
from hpcgan.sweep.expand import (  # noqa: F401
    Task,
    classifier_name,
    expand,
    gan_name,
    hydra_value,
    kv,
    scarce_args,
    shard_dir,
    slug,
)
from hpcgan.sweep.launch import (  # noqa: F401
    check_inputs,
    launch,
    launch_lock,
    resolve_executor,
    run_local,
)
from hpcgan.sweep.queue import sacct_jobs, slurm_cmd, squeue_jobs  # noqa: F401
from hpcgan.sweep.run import TaskRunner, command, run_task, tail  # noqa: F401
from hpcgan.sweep.settings import (  # noqa: F401
    ACTIVE,
    EXECUTORS,
    FORMAT,
    SIMULATOR_LAYOUTS,
    STAGES,
    STATES,
    STUDY_FILE,
    SUBMISSIONS,
    TOOLS,
    ClassifyGrid,
    ClusterSettings,
    DataSettings,
    EvaluateStage,
    GanGrid,
    GenerateStage,
    Resources,
    StudySettings,
    SweepError,
    TaskError,
    default_resources,
    model_conditional,
    model_names,
    needs_synthetic,
)
from hpcgan.sweep.slurm import plan_arrays, preflight, slurm_executor, submit_slurm  # noqa: F401
from hpcgan.sweep.status import (  # noqa: F401
    TaskStatus,
    collect_status,
    failure_tails,
    status_report,
    status_table,
    study_summary,
    summary_table,
    watch,
)
from hpcgan.sweep.tasks import (  # noqa: F401
    LaunchResult,
    TaskFiles,
    describe_holder,
    finished,
    holder_alive,
    job_id,
    latest_jobs,
    pid_alive,
    read_study,
    read_submissions,
    record_submission,
    write_study,
)
