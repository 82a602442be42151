from megatron_opd.doctor.cli import console

console()
